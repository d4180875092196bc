"""Launched by `deepspeed --num_gpus 2`: one optimizer step with k micro-batches and feature
caching must equal one step over the k-times-larger micro-batch (ZeRO stage from argv).

Plain SGD with lr 1 makes the parameter change equal to minus the gradient, so any error in
accumulation scaling (or the logit scale's gradient counted k times) shows up in full;
AdamW's first step would hide it (its update is ~lr·sign(g)). Writes the max absolute
parameter difference to argv[2] (JSON) from rank 0.

Optional argv[3]: a patch-dropout rate for the image tower (with gradient checkpointing on it):
the caching and re-encoding passes must then keep the same tokens. argv[1] may list several
ZeRO stages ("1,2,3"), run one after another in this one launch.
"""
import dataclasses
import json
import sys

import torch

from mmcl.engine.runtime import init_process_group, select_accelerator

select_accelerator()

import deepspeed  # noqa: E402

from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig  # noqa: E402
from mmcl.distributed import get_rank, run_command  # noqa: E402
from mmcl.engine.feature_cache import feature_cache_step  # noqa: E402
from mmcl.engine.steps import plain_step  # noqa: E402
from mmcl.engine.task import TrainingTask  # noqa: E402
from mmcl.engine.zero import full_parameters  # noqa: E402
from mmcl.models import build_model  # noqa: E402
from mmcl.models.patch_dropout import patch_dropout_hooks  # noqa: E402

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


def one_step(stage: int, micro: int, accum: int, cached: bool, model_cfg: ModelConfig = MODEL) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    task = TrainingTask(build_model(model_cfg), {"clip": 1.0})
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
        parameters = {name: p.detach().clone().float() for name, p in engine.module.named_parameters()}
    hooks = patch_dropout_hooks(task)
    if hooks:  # tokens per image the image tower's layers saw in the last training forward
        parameters["tokens"] = torch.tensor(float(hooks[0].tokens_out))
    return parameters


def measure(stages: list[int], patch_dropout: float | None = None) -> dict[int, dict]:
    """stage -> the reference/accumulated comparison; needs the process group (`init_process_group`)."""
    model_cfg = MODEL
    if patch_dropout is not None:
        image = dataclasses.replace(MODEL.image, patch_dropout=patch_dropout, gradient_checkpointing=True)
        model_cfg = dataclasses.replace(MODEL, image=image)
    results = {}
    for stage in stages:
        reference = one_step(stage, MICRO * ACCUM, 1, cached=False, model_cfg=model_cfg)
        accumulated = one_step(stage, MICRO, ACCUM, cached=True, model_cfg=model_cfg)
        tokens = {"reference": reference.pop("tokens", None), "accumulated": accumulated.pop("tokens", None)}
        initial_scale = torch.log(torch.tensor(1 / 0.07))
        diffs = {name: (reference[name] - accumulated[name]).abs().max().item() for name in reference}
        results[stage] = {"max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                          "logit_scale_change": abs(reference["model.logit_scale"].item() - initial_scale.item()),
                          **{f"tokens_{k}": None if v is None else v.item() for k, v in tokens.items()}}
    return results


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank
    stages, out_path = [int(stage) for stage in args[0].split(",")], args[1]
    init_process_group()
    results = measure(stages, float(args[2]) if len(args) > 2 else None)
    if get_rank() == 0:
        json.dump(results[stages[0]] if len(stages) == 1 else results, open(out_path, "w"))

if __name__ == "__main__":
    run_command(main)
