"""Launched by `deepspeed --num_gpus 2`: BYOL's EMA target under ZeRO 1, 2 and 3 (one engine each).

After one optimizer step, `after_optimizer_step` must set target = m * target0 + (1 - m) * online
for every parameter, with the online weights whole even where ZeRO-3 partitions them, the same
on both ranks; the target stays out of the engine's parameters and the optimizer and gets no
gradient. Writes one JSON record per stage to argv[1] from rank 0.
"""
import json
import sys

import torch
import torch.distributed as dist

from mmcl.engine.runtime import init_process_group, select_accelerator

select_accelerator()

import deepspeed  # noqa: E402

from mmcl.config import from_dict  # noqa: E402
from mmcl.distributed import get_rank, run_command  # noqa: E402
from mmcl.engine.optim import parameter_groups  # noqa: E402
from mmcl.engine.zero import full_parameters  # noqa: E402
from mmcl.engine.steps import plain_step  # noqa: E402
from mmcl.engine.task import TrainingTask  # noqa: E402
from mmcl.engine.zero import gatherer  # noqa: E402
from mmcl.models import build_model, cosine_momentum  # noqa: E402

CONFIG = from_dict({
    "model": {"image": {"config": dict(model_type="vit", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
                        "pooling": "cls", "projection": "none"},
              "embed_dim": 32},
    "objectives": {"byol": 1.0},
    "ssl": {"byol": {"hidden_dim": 24, "out_dim": 8, "base_momentum": 0.9}},
})
TOTAL_STEPS = 10


def views(rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    return {"views": [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]}


def check(stage: int) -> dict:
    torch.manual_seed(0)
    task = TrainingTask(build_model(CONFIG.model), CONFIG.objectives, None, CONFIG)
    byol = task.objectives["byol"]
    initial_target = [t.clone() for t, _ in byol.parameter_pairs()]
    optimizer = torch.optim.AdamW(parameter_groups(task, CONFIG.optim, "model."), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
    plain_step(engine, [views(get_rank())])
    logged = task.after_optimizer_step(1, TOTAL_STEPS, gatherer(engine))
    momentum = cosine_momentum(0, TOTAL_STEPS, 0.9)
    with full_parameters(engine):
        online = [o.detach().clone().float() for _, o in byol.parameter_pairs()]
    target = [t for t, _ in byol.parameter_pairs()]
    expected = [momentum * t0 + (1 - momentum) * o for t0, o in zip(initial_target, online)]
    checksum = torch.stack([t.double().sum() for t in target])
    other = checksum.clone()
    dist.broadcast(other, src=1)  # rank 1's checksums, compared on rank 0
    target_ids = {id(t) for t in target}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {
        "stage": stage,
        "momentum": logged["byol/momentum"],
        "max_error": max((t - e).abs().max().item() for t, e in zip(target, expected)),
        "moved": max((t - t0).abs().max().item() for t, t0 in zip(target, initial_target)),
        "online_moved": max((o - t0).abs().max().item() for o, t0 in zip(online, initial_target)),
        "ranks_equal": bool(torch.equal(checksum, other)),
        "target_in_engine": bool(target_ids & {id(p) for p in engine.module.parameters()}),
        "target_in_optimizer": bool(target_ids & optimized),
        "target_has_grad": any(t.requires_grad or t.grad is not None for t in target),
        "target_dtype": str(target[0].dtype),
    }


def measure() -> list[dict]:
    """One record per ZeRO stage; needs the process group."""
    return [check(stage) for stage in (1, 2, 3)]


def main() -> None:
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank
    init_process_group()
    records = measure()
    if get_rank() == 0:
        json.dump(records, open(out_path, "w"))


if __name__ == "__main__":
    run_command(main)
