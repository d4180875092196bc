"""Zero-shot accuracy where aspect ratio matters: NaFlex vs square squash vs square centre crop, equal compute.

    python benchmarks/naflex_aspect.py --work /tmp/naflex_aspect [--steps 300] [--seeds 0 1]

Data: `aspect_dataset.py` (shapes of 12 classes near the ends of 4:1 and 1:4 canvases). Three
arms, each trained with mmcl's real trainer (`python train.py --config <yaml>`, one process) and
evaluated by that run's own end-of-training zero-shot evaluation on the held-out classification
shard of its view, so each model is evaluated the way it was trained:

- `naflex`: the canvases as they are; `data.naflex` resizes each keeping its aspect ratio so that
  its grid of P-px patches fits N patches (a 256x64 canvas -> 64x16 px = 16x4 patches);
- `squash`: the canvases squashed to a square, then the same tower at (sqrt(N)*P)^2 px;
- `crop`:   the centre square of each canvas, then the same tower at (sqrt(N)*P)^2 px.

The square views are made once by `aspect_dataset.py` (the squash with NaFlex's own bilinear
antialiased resize, the crop without resampling) and stored as lossless PNG; NaFlex's resize of
a square image to (sqrt(N)*P)^2 px is then the square tower's resize. All three arms run the
same config (a tiny SigLIP 2 image tower with N = `--max-patches` positions, SigLIP 2 text tower,
sigmoid loss) with the same steps and batch, so every step sees the same number of image tokens
(B x N: NaFlex pads each image to N; a square image has exactly N patches). Only the shards differ.

Results are cached per run in <work>/results/<arm>_seed<s>.json (keyed by the run's config), so a
rerun with the same options only prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from aspect_dataset import build_aspect  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
ARMS = {"naflex": "native", "squash": "squash", "crop": "crop"}


def cpu_line() -> str:
    """The CPU's name and bf16 support (the benchmarks' usual first line)."""
    name, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return (f"CPU: {name}, {os.cpu_count()} cores; AVX-512 BF16: {'yes' if 'avx512_bf16' in flags else 'no'}; "
            f"AMX-BF16: {'yes' if 'amx_bf16' in flags else 'no'}")


def load_average() -> float:
    return os.getloadavg()[0]


def run_config(info: dict, arm: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """The run's config: identical for every arm but the shards (and output folder)."""
    view = info[ARMS[arm]]
    width = args.width
    return {
        "model": {
            "image": {"config": {"model_type": "siglip2_vision_model", "patch_size": args.patch,
                                 "num_patches": args.max_patches, "num_channels": 3, "hidden_size": width,
                                 "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                                 "intermediate_size": 2 * width},
                      "projection": "none"},
            "text": {"config": {"model_type": "siglip2_text_model", "vocab_size": 256, "hidden_size": width,
                                "num_hidden_layers": args.text_layers, "num_attention_heads": args.heads,
                                "intermediate_size": 2 * width, "max_position_embeddings": 16,
                                "projection_size": width},
                     "tokenizer": info["tokenizer"], "context_length": 16, "projection": "none"},
            "embed_dim": width, "logit_scale_init": 10.0, "logit_bias_init": -10.0,
        },
        "objectives": {"siglip": 1.0},
        "data": {"train_shards": view["train"], "naflex": {"patch_size": args.patch, "max_num_patches": args.max_patches},
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "shuffle_buffer": 600, "num_workers": 1},
        "output_dir": str(out),
        "seed": seed,
        "optim": {"lr": args.lr, "weight_decay": 0.1, "warmup_steps": max(1, args.steps // 10), "schedule": "cosine"},
        "train": {"micro_batch_size": args.batch, "steps": args.steps, "log_every": max(1, args.steps // 5),
                  "checkpoint_every": 0},
        "eval": {"zeroshot_shards": view["classification"], "batch_size": 240},
    }


def train(info: dict, arm: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / "runs" / f"{arm}_seed{seed}"
    config = run_config(info, arm, seed, args, out)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cached = work / "results" / f"{arm}_seed{seed}.json"
    if cached.is_file() and json.loads(cached.read_text()).get("fingerprint") == key:
        return json.loads(cached.read_text())
    if out.exists():
        shutil.rmtree(out)  # a stale run of this benchmark (its own output folder)
    path = work / "configs" / f"{arm}_seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / "logs" / f"{arm}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    load = load_average()
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed} (load {load:.1f}) ...", flush=True)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(path)], cwd=REPO,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    log.write_text(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {result.returncode}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    row = {"fingerprint": key, "arm": arm, "seed": seed, "acc1": metrics["zeroshot/acc1"],
           "acc5": metrics.get("zeroshot/acc5"), "steps": metrics.get("steps"), "wall_s": round(wall, 1),
           "samples_per_s": statistics.median(speeds) if speeds else None, "load_before": load,
           "load_after": load_average(), "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=2) + "\n")
    print(f"  acc1 {row['acc1']:.4f}, {wall:.0f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the data, configs, runs and cached results")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-patches", type=int, default=64, help="N: NaFlex's patch budget = the square grid's size")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args(argv)
    side = int(round(args.max_patches ** 0.5))
    if side * side != args.max_patches:
        raise SystemExit(f"--max-patches {args.max_patches} is not a square number; the square towers need one.")
    work = Path(args.work)
    print(cpu_line())
    print(f"python {platform.python_version()}; load average {load_average():.1f} at start; the machine is shared "
          f"with other agents' jobs", flush=True)
    info = build_aspect(work / "data")
    print(f"held-out set: {info['held_out']}", flush=True)
    rows = [train(info, arm, seed, args, work) for seed in args.seeds for arm in args.arms]
    print()
    print(f"{args.steps} steps x {args.batch} images x {args.max_patches} patch positions "
          f"(square arms at {side * args.patch}x{side * args.patch} px); seeds {args.seeds}")
    print()
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| arm | training and evaluation input | {seeds} | mean | min-max | mean run s |")
    print("|---|---|" + "---:|" * (len(args.seeds) + 3))
    described = {"naflex": "native aspect ratio (NaFlex, <= N patches, padded to N)",
                 "squash": f"squashed to a square, {side}x{side} patches",
                 "crop": f"centre square crop, {side}x{side} patches"}
    for arm in args.arms:
        accs = [r["acc1"] for r in rows if r["arm"] == arm]
        walls = [r["wall_s"] for r in rows if r["arm"] == arm]
        cells = " | ".join(f"{100 * a:.1f}%" for a in accs)
        print(f"| {arm} | {described[arm]} | {cells} | {100 * statistics.mean(accs):.1f}% | "
              f"{100 * min(accs):.1f}-{100 * max(accs):.1f} | {statistics.mean(walls):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
