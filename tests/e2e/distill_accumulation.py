"""Launched by `deepspeed --num_gpus 2`: with clip + distill, one feature-cached optimizer step over k
micro-batches must equal one step over the k-times-larger micro-batch, under ZeRO 1, 2 and 3 (the
teacher's logits then span the whole accumulated global batch, as the large batch's do).

The teacher is a second, differently seeded mmcl model at another image size (24 px against the
student's 16) with its own token length, kept outside DeepSpeed. Plain SGD with lr 1 makes the
parameter change equal to minus the gradient. Writes, from rank 0, the max absolute parameter
difference per stage, the distill loss of the first step, and whether any teacher tensor is
among the engine's parameters (JSON, argv[1]).
"""
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
from mmcl.objectives.distill import DistillObjective  # noqa: E402
from mmcl.objectives.teacher import Teacher, TeacherInputs  # noqa: E402

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def model_config(image_size: int, context: int, embed_dim: int) -> ModelConfig:
    return ModelConfig(
        image=TowerConfig(config=dict(model_type="vit", image_size=image_size, patch_size=8, **ENCODER)),
        text=TextTowerConfig(config=dict(model_type="bert", vocab_size=50, max_position_embeddings=context, **ENCODER),
                             tokenizer="unused", context_length=context),
        embed_dim=embed_dim,
    )


MICRO, ACCUM = 4, 3


def teacher() -> Teacher:
    torch.manual_seed(123)
    model = build_model(model_config(24, 10, 12))
    inputs = TeacherInputs(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None, 10)
    return Teacher(model, model.encode_image, model.encode_text, 20.0, inputs, "test teacher")


def batch(rank: int, size: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * rank)
    return {
        "pixel_values": torch.randn(size, 3, 16, 16, generator=generator),
        "input_ids": torch.randint(1, 50, (size, 8), generator=generator),
        "attention_mask": torch.ones(size, 8, dtype=torch.long),
        "teacher_pixel_values": torch.randn(size, 3, 24, 24, generator=generator),
        "teacher_input_ids": torch.randint(1, 50, (size, 10), generator=generator),
        "teacher_attention_mask": torch.ones(size, 10, dtype=torch.long),
        "keys": [f"{rank}-{i}" for i in range(size)],
    }


def one_step(stage: int, micro: int, accum: int, cached: bool) -> tuple[dict[str, torch.Tensor], float, bool]:
    torch.manual_seed(0)
    task = TrainingTask(build_model(model_config(16, 8, 16)), {"clip": 1.0})
    task.objectives["distill"] = DistillObjective(teacher())
    task.weights["distill"] = 1.0
    task.needs = task.needs | DistillObjective.needs
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=config)
    full = batch(get_rank(), MICRO * ACCUM)
    micro_batches = [{k: v[i * micro:(i + 1) * micro] for k, v in full.items()} for i in range(accum)]
    metrics, _ = (feature_cache_step if cached else plain_step)(engine, micro_batches)
    assert engine.global_steps == 1, engine.global_steps
    teacher_seen = any("teacher" in name for name, _ in engine.module.named_parameters())
    with full_parameters(engine):
        return ({name: p.detach().clone().float() for name, p in engine.module.named_parameters()},
                float(metrics["distill"]), teacher_seen)


def measure() -> dict[str, dict]:
    """"stage1".."stage3" -> the reference/accumulated comparison; needs the process group."""
    results = {}
    for stage in (1, 2, 3):
        reference, reference_loss, seen = one_step(stage, MICRO * ACCUM, 1, cached=False)
        accumulated, accumulated_loss, _ = one_step(stage, MICRO, ACCUM, cached=True)
        diffs = {name: (reference[name] - accumulated[name]).abs().max().item() for name in reference}
        results[f"stage{stage}"] = {"max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
                                    "reference_distill": reference_loss, "accumulated_distill": accumulated_loss,
                                    "teacher_in_engine": seen}
    return results


def main() -> None:
    out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    init_process_group()
    results = measure()
    if get_rank() == 0:
        json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    run_command(main)
