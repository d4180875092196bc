"""Launched by `deepspeed --num_gpus 2`: one optimizer step with k micro-batches and feature
caching must equal one step over the k-times-larger micro-batch (ZeRO stage from argv).

Plain SGD with lr 1 makes the parameter change equal to minus the gradient, so any error in
accumulation scaling (or the logit scale's gradient counted k times) shows up in full;
AdamW's first step would hide it (its update is ~lr·sign(g)). Writes the max absolute
parameter difference to argv[2] (JSON) from rank 0.
"""
import json
import sys

import torch

from mmcl.engine.runtime import init_process_group, select_accelerator

select_accelerator()

import deepspeed  # noqa: E402

from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig  # noqa: E402
from mmcl.distributed import get_rank  # noqa: E402
from mmcl.engine.periodic_eval import full_parameters  # noqa: E402
from mmcl.engine.steps import feature_cache_step, plain_step  # noqa: E402
from mmcl.engine.task import ContrastiveTask  # noqa: E402
from mmcl.models import build_model  # noqa: E402

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODEL = ModelConfig(
    image=TowerConfig(config=dict(model_type="vit", image_size=16, patch_size=8, **ENCODER)),
    text=TextTowerConfig(config=dict(model_type="bert", vocab_size=50, max_position_embeddings=8, **ENCODER),
                         tokenizer="unused", context_length=8),
    embed_dim=16,
)
MICRO, ACCUM = 4, 3


def batch(rank: int, size: int, offset: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * rank + offset)
    return {
        "pixel_values": torch.randn(size, 3, 16, 16, generator=generator),
        "input_ids": torch.randint(1, 50, (size, 8), generator=generator),
        "attention_mask": torch.ones(size, 8, dtype=torch.long),
    }


def one_step(stage: int, micro: int, accum: int, cached: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    task = ContrastiveTask(build_model(MODEL), {"clip": 1.0})
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
    full = batch(get_rank(), MICRO * ACCUM, 0)
    micro_batches = [{k: v[i * micro:(i + 1) * micro] for k, v in full.items()} for i in range(accum)]
    (feature_cache_step if cached else plain_step)(engine, micro_batches)
    assert engine.global_steps == 1, engine.global_steps
    with full_parameters(engine):
        return {name: p.detach().clone().float() for name, p in engine.module.named_parameters()}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
    stage, out_path = int(args[0]), args[1]
    init_process_group()
    reference = one_step(stage, MICRO * ACCUM, 1, cached=False)
    accumulated = one_step(stage, MICRO, ACCUM, cached=True)
    initial_scale = torch.log(torch.tensor(1 / 0.07))
    diffs = {name: (reference[name] - accumulated[name]).abs().max().item() for name in reference}
    if get_rank() == 0:
        json.dump({"max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                   "logit_scale_change": abs(reference["model.logit_scale"].item() - initial_scale.item())},
                  open(out_path, "w"))


if __name__ == "__main__":
    main()
