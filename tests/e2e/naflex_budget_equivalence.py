"""Launched by `deepspeed --num_gpus 2` (tests/e2e/test_naflex_budget_equivalence.py): NaFlex steps with the token
budget over 2 ranks equal the same steps in one process over the concatenated batch, in float64.

argv: the shards pattern, the output JSON path.

1. Before any process group exists, every rank builds the training loader of each of the 2 ranks
   (`training_data.build`, as the trainer does: data.naflex.sequence_lengths [8, 16], token_budget 32,
   so a micro-batch holds 4 images at length 8 and 2 at length 16; 2 micro-batches per step) and, for
   each of the epoch's steps, evaluates the siglip loss of tiny SigLIP 2 towers (float64) over all
   4 micro-batches of the step at once, in this one process, and takes every parameter's gradient.
2. Then each rank joins the gloo group and runs the same steps as the trainer: its own loader, the
   DeepSpeed engine (ZeRO stage 0, so every parameter's `.grad` holds the data-parallel average after
   the boundary backward), feature-cache accumulation over the step's 2 micro-batches, the sigmoid
   loss over the all-gathered batch. The optimizer is SGD with lr 0, so every step starts from the
   same weights as the reference.

Rank 0 writes per step: the sequence length, the images per micro-batch on each rank, the step's
global batch, the loss of both ways, and the largest absolute difference of the loss and of any gradient
(the image tower's position embedding apart: transformers computes its gradient in float32).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: siglip2_source

from mmcl.engine.runtime import init_process_group, select_accelerator  # noqa: E402

select_accelerator()

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mmcl.config import from_dict  # noqa: E402
from mmcl.distributed import get_rank, run_command  # noqa: E402
from mmcl.engine import training_data  # noqa: E402
from mmcl.engine.feature_cache import feature_cache_backward  # noqa: E402
from mmcl.engine.steps import optimizer_step  # noqa: E402
from mmcl.engine.task import TrainingTask  # noqa: E402
from mmcl.engine.trainer import _step_global_batch  # noqa: E402
from mmcl.models import build_model  # noqa: E402
from siglip2_source import gemma_tokenizer  # noqa: E402

WORLD, ACCUM, LENGTHS, BUDGET = 2, 2, [8, 16], 32
VISION = {"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "patch_size": 8, "num_patches": 16}
TEXT = {"model_type": "siglip2_text_model", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8, "projection_size": 32}


# transformers' Siglip2VisionEmbeddings resizes the position grid with a float32 matmul whatever the tower's dtype,
# so this one gradient is a float32 sum, whose rounding depends on how the batch is split: compared apart.
FLOAT32_GRADIENT = "model.image_tower.embeddings.position_embedding.weight"


def run_config(shards: str):
    return from_dict({
        "model": {"image": {"config": VISION}, "text": {"config": TEXT, "tokenizer": "unused-hub-id", "context_length": 8},
                  "embed_dim": 16, "logit_bias_init": -10.0, "logit_scale_init": 10.0},
        "objectives": {"siglip": 1.0},
        "data": {"train_shards": shards, "num_workers": 1, "shuffle_buffer": 8, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3,
                 "naflex": {"patch_size": 8, "max_num_patches": 16, "sequence_lengths": LENGTHS, "token_budget": BUDGET}},
        "train": {"micro_batch_size": 3, "grad_accum_steps": ACCUM, "accumulation": "feature_cache"},
        "output_dir": "unused", "seed": 0,  # seed 0: step 0 at length 16, step 1 at 8
    })


def fresh_task(cfg) -> TrainingTask:
    torch.manual_seed(0)
    return TrainingTask(build_model(cfg.model), cfg.objectives, None, cfg).double()


def as_float64(batch: dict) -> dict:
    return {key: value.double() if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items()}


def steps(loader) -> list[list[dict]]:
    """The epoch's micro-batches, grouped by optimizer step."""
    batches = [as_float64(batch) for batch in loader]
    return [batches[i:i + ACCUM] for i in range(0, len(batches), ACCUM)]


def reference(cfg, tokenizer) -> list[dict]:
    """Per step: the loss and every gradient over the concatenation of both ranks' micro-batches, one process."""
    per_rank = [steps(training_data.build(cfg, tokenizer, rank, WORLD)) for rank in range(WORLD)]
    results = []
    for step_batches in zip(*per_rank):
        micro = [batch for rank_batches in step_batches for batch in rank_batches]
        joined = {key: torch.cat([batch[key] for batch in micro]) if torch.is_tensor(micro[0][key]) else
                  [item for batch in micro for item in batch[key]] for key in micro[0]}
        task = fresh_task(cfg)
        loss = task(joined)["loss"]
        loss.backward()
        results.append({"loss": loss.detach(), "keys": joined["keys"],
                        "grads": {name: p.grad.detach().clone() for name, p in task.named_parameters() if p.grad is not None}})
    return results


def distributed(cfg, tokenizer) -> list[dict]:
    """Per step on this rank: the step as the trainer runs it over 2 ranks (see the module docstring)."""
    task = fresh_task(cfg)
    accelerator = get_accelerator()
    supported = accelerator.supported_dtypes()
    # DeepSpeed's CPU accelerator lists float32/bf16 as reducible; gloo reduces float64 as well, and the
    # check needs DeepSpeed's own gradient all-reduce to run in float64 (its code is dtype-agnostic).
    accelerator.supported_dtypes = lambda: supported + [torch.float64]
    ds_config = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "gradient_accumulation_steps": ACCUM,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=torch.optim.SGD(task.parameters(), lr=0.0),
                                           config=ds_config)
    engine.communication_data_type = torch.float64  # its config accepts fp16/bf16/fp32 only; float32 is the default
    results = []
    for micro in steps(training_data.build(cfg, tokenizer, get_rank(), WORLD)):
        accumulated = feature_cache_backward(engine, task, micro)
        loss = accumulated.metrics["loss"].clone()
        dist.all_reduce(loss)  # each rank's loss is its images against all texts; the mean over ranks is the loss
        grads = {name: p.grad.detach().clone() for name, p in engine.module.named_parameters() if p.grad is not None}
        keys: list = [None] * WORLD
        dist.all_gather_object(keys, [k for batch in micro for k in batch["keys"]])
        results.append({"loss": loss / WORLD, "grads": grads, "keys": [k for part in keys for k in part],
                        "length": int(micro[0]["pixel_values"].shape[1]),
                        "images": [len(batch["keys"]) for batch in micro],
                        "global_batch": _step_global_batch(micro, WORLD)})
        optimizer_step(engine, accumulated)  # lr 0: the weights stay; DeepSpeed clears the gradients
    return results


def diff(ref: dict, step: dict, name: str) -> float:
    return (ref["grads"][name] - step["grads"][name]).abs().max().item()


def main() -> None:
    shards, out_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][:2]  # the launcher adds --local_rank
    cfg = run_config(shards)
    tokenizer = gemma_tokenizer()
    expected = reference(cfg, tokenizer)  # before the process group: one process, no all-gather
    init_process_group()
    got = distributed(cfg, tokenizer)
    if get_rank() == 0:
        report = []
        for ref, step in zip(expected, got):
            names = sorted(ref["grads"])
            report.append({
                "length": step["length"], "images_per_micro_batch": step["images"], "global_batch": step["global_batch"],
                "same_samples": sorted(ref["keys"]) == sorted(step["keys"]),
                "loss_reference": ref["loss"].item(), "loss_ranks": step["loss"].item(),
                "loss_diff": abs(ref["loss"].item() - step["loss"].item()),
                "grad_names_equal": names == sorted(step["grads"]), "parameters": len(names),
                "grad_max_diff": max(diff(ref, step, n) for n in names if n != FLOAT32_GRADIENT),
                "grad_max_abs": max(ref["grads"][n].abs().max().item() for n in names),
                "worst": max((n for n in names if n != FLOAT32_GRADIENT), key=lambda n: diff(ref, step, n)),
                "position_embedding_diff": diff(ref, step, FLOAT32_GRADIENT),
                "position_embedding_max_abs": ref["grads"][FLOAT32_GRADIENT].abs().max().item(),
                "dtype": str(step["grads"][names[0]].dtype),
            })
        Path(out_path).write_text(json.dumps({"steps": report, "reference_steps": len(expected), "steps_run": len(got)}))


if __name__ == "__main__":
    run_command(main)
