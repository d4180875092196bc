"""The teacher's cost per training step, in one process: clip alone vs clip + distill (teacher
encoding each batch) vs clip + distill with every teacher feature found in the cache.

One batch of the given size (random pixels and tokens at the student's and the teacher's
shapes) goes through the task's forward + backward (no DeepSpeed, no data loading: the step's
model compute only). The three variants alternate for --repeats rounds; the best time of each
counts (steadier on a shared machine). Prints samples/s and the ratio to clip alone.

    python benchmarks/distill_step.py --teacher /tmp/distill_bench/teacher/model --batch 64 --repeats 10
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distillation import cpu_description, tower  # noqa: E402

from mmcl.config import from_dict  # noqa: E402
from mmcl.engine.task import TrainingTask  # noqa: E402
from mmcl.models import build_model  # noqa: E402
from mmcl.objectives.distill import DistillObjective, cache_fingerprint  # noqa: E402
from mmcl.objectives.teacher_cache import TeacherFeatureCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_description(), "| 1 thread", flush=True)
    raw = {"model": {"image": {"config": tower(64, 2, "vit"), "pooling": "cls"},
                     "text": {"config": tower(64, 1, "bert"), "tokenizer": "unused", "context_length": 24,
                              "pooling": "mean"}, "embed_dim": 64},
           "objectives": {"clip": 1.0, "distill": 1.0}, "distill": {"teacher": args.teacher}}
    cfg = from_dict(raw)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    clip = TrainingTask(model, {"clip": 1.0})
    distill = TrainingTask(model, {"clip": 1.0, "distill": 1.0}, cfg=cfg)
    teacher = distill.objectives["distill"].teacher
    cached = TrainingTask(model, {"clip": 1.0}, cfg=cfg)
    with tempfile.TemporaryDirectory() as folder:
        cached.objectives["distill"] = DistillObjective(teacher, TeacherFeatureCache(folder, cache_fingerprint(cfg, teacher)))
        cached.weights["distill"], cached.needs = 1.0, distill.needs
        inputs = teacher.inputs()
        n = args.batch
        batch = {"pixel_values": torch.randn(n, 3, 32, 32), "input_ids": torch.randint(1, 200, (n, 24)),
                 "attention_mask": torch.ones(n, 24, dtype=torch.long), "keys": [str(i) for i in range(n)],
                 "teacher_pixel_values": torch.randn(n, 3, inputs.image_size, inputs.image_size),
                 "teacher_input_ids": torch.randint(1, 200, (n, inputs.context_length)),
                 "teacher_attention_mask": torch.ones(n, inputs.context_length, dtype=torch.long)}
        cached(batch)  # fills the cache: every later step finds all its teacher features
        best = {"clip": float("inf"), "clip + distill": float("inf"), "clip + distill, cache hit": float("inf")}
        tasks = {"clip": clip, "clip + distill": distill, "clip + distill, cache hit": cached}
        for _ in range(args.repeats):
            for name, task in tasks.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                task(batch)["loss"].backward()
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"\n| step (batch {n}, forward + backward) | samples/s | vs clip alone |\n|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {n / seconds:.0f} | {best['clip'] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
