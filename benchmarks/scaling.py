"""Data-parallel scaling of mmcl's training step: samples/s at 1 and 2 ranks (weak scaling).

The step of `benchmarks/train_step.py` (the same tiny CLIP, ZeRO-1 engine, fp32, SDPA
attention, torch AdamW) under the real `deepspeed` launcher, with a fixed per-rank batch and
one thread per rank (on the CPU each rank gets one core, so 2 ranks use the machine's 2
cores). Efficiency = samples/s at N ranks / (N x samples/s at 1 rank); the loss all-gathers
features and DeepSpeed all-reduces gradients, which is what the efficiency prices.

    python benchmarks/scaling.py [--ranks 1 2] [--batch 64] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(batch_size: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from train_step import BATCH_FOR_FLOPS, mmcl_step_fn, synthetic_batch

    torch.set_num_threads(1)
    BATCH_FOR_FLOPS[0] = batch_size
    _, step, flops = mmcl_step_fn("fp32", "sdpa")  # initialises the process group
    batch = synthetic_batch(batch_size)
    for _ in range(2):  # warm-up
        step(batch)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step(batch)
        dist.barrier()
        times.append(time.perf_counter() - start)
    from mmcl.engine.cli import release_shared_memory

    release_shared_memory()  # DeepSpeed's CPU all-reduce buffer in /dev/shm
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"ranks": dist.get_world_size(), "batch_per_rank": batch_size,
                                         "seconds_per_step": statistics.median(times), "gflop_per_rank_step": flops / 1e9}))


def launch(ranks: int, batch_size: int, steps: int) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [str(launcher), "--num_gpus", str(ranks), str(Path(__file__).resolve()), "--worker",
                   "--batch", str(batch_size), "--steps", str(steps), "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{ranks}-rank run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()  # the launcher appends --local_rank
    if args.worker:
        worker(args.batch, args.steps, args.out)
        return
    results = [launch(ranks, args.batch, args.steps) for ranks in args.ranks]
    base = results[0]["batch_per_rank"] / results[0]["seconds_per_step"] / results[0]["ranks"]
    print(f"per-rank batch {args.batch}, 1 thread per rank, median of {args.steps} steps")
    print("| ranks | global batch | s/step | samples/s | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        rate = r["ranks"] * r["batch_per_rank"] / r["seconds_per_step"]
        print(f"| {r['ranks']} | {r['ranks'] * r['batch_per_rank']} | {r['seconds_per_step']:.2f} | {rate:.1f} | "
              f"{rate / (r['ranks'] * base):.0%} |")


if __name__ == "__main__":
    main()
