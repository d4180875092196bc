"""Distillation evidence and the teacher's throughput cost, on a shapes dataset built here.

1. Builds `shapes`: 32-px PNGs of one coloured shape (circle, square, triangle, cross, ring,
   diamond) x (red, green, blue, yellow) = 24 classes at a random position and size on a noisy
   background, captions in varied phrasings ("a small red circle on a grey background", ...),
   held-out images for zero-shot classification, and a BPE tokenizer trained on the captions.
2. Trains a teacher (ViT 128-wide x 4 layers on 8-px patches, BERT 128 x 2) for --teacher-steps steps.
3. Trains a smaller student (ViT 64 x 2, BERT 64 x 1) for --student-steps steps, with the same
   seed, data and schedule, in two rounds of concurrent runs (runs of one round share the
   machine's other load, so their ratios compare like with like): round 1 clip alone, clip +
   distill (the teacher's mmcl model directory), clip + distill with distill.cache_dir (cold:
   filling it); round 2 clip alone again and clip + distill reading the cache (warm).
4. Prints zero-shot top-1 of each on the held-out images and the training throughput
   (samples/s: the median of the logged windows after the first) with ratios to clip alone
   of the same round.

Every run is `python train.py` in one process (DeepSpeed, ZeRO-2, one rank, 1 data worker).

    python benchmarks/distillation.py --work /tmp/distill_bench [--teacher-steps 600 --student-steps 150]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]
COLOURS = {"red": (210, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 210), "yellow": (220, 200, 40)}
CAPTIONS = ["a {size} {colour} {shape} on a {bg} background", "a {colour} {shape}", "{colour} {shape}",
            "a picture of a {colour} {shape}", "the {shape} is {colour}", "a {size} {shape}, coloured {colour}"]
TEMPLATES = ["a {}", "a picture of a {}", "{}"]


def shape_png(shape: str, colour: str, rng: random.Random, size: int = 32) -> tuple[bytes, str, str]:
    """One image (PNG bytes), its size word and background word."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    grey = rng.randint(70, 190)
    bg = "dark" if grey < 110 else "light" if grey > 150 else "grey"
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, (size, size, 3))
    image = Image.fromarray(np.clip(grey + noise, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    radius = rng.randint(5, 12)
    word = "small" if radius < 8 else "large"
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=jitter)
    elif shape == "ring":
        draw.ellipse(box, outline=jitter, width=max(2, radius // 3))
    elif shape == "square":
        draw.rectangle(box, fill=jitter)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=jitter)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=jitter)
    else:  # cross
        w = max(2, radius // 3)
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=jitter)
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=jitter)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue(), word, bg


def build_shapes(out: Path, train: int, held_out: int, seed: int = 0) -> Path:
    sys.path.insert(0, str(REPO))
    from data_tools.samples import SourceItem
    from data_tools.sources import Source
    from data_tools.train_tokenizer import train_tokenizer
    from data_tools.write_shards import write_shards

    if (out / "done").is_file():
        return out
    classes = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    rng = random.Random(seed)

    def items(n: int, captions: bool) -> list:
        made = []
        for i in range(n):
            label = i % len(classes)
            colour, shape = classes[label].split()
            png, size, bg = shape_png(shape, colour, rng)
            text = rng.choice(CAPTIONS).format(size=size, colour=colour, shape=shape, bg=bg) if captions else classes[label]
            made.append(SourceItem(source=f"shapes[{i}]", image=png, captions=(text,), label=label))
        return made

    train_items = items(train, True)
    write_shards(train_items, out / "train", samples_per_shard=1000, overwrite=True)
    write_shards(Source(items(held_out, False), classnames=classes), out / "classification",
                 samples_per_shard=1000, overwrite=True)
    (out / "classification" / "templates.json").write_text(json.dumps(TEMPLATES))
    train_tokenizer([i.captions[0] for i in train_items] + [t.format(c) for t in TEMPLATES for c in classes],
                    out / "tokenizer", model_type="bpe", vocab_size=200, overwrite=True)
    (out / "done").write_text("")
    return out


def tower(width: int, layers: int, kind: str) -> dict:
    base = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * width)
    if kind == "vit":
        return dict(model_type="vit", image_size=32, patch_size=8, num_channels=3, **base)
    return dict(model_type="bert", vocab_size=256, max_position_embeddings=24, **base)


def run_config(data: Path, out: Path, width: int, image_layers: int, text_layers: int, steps: int, seed: int) -> dict:
    shards = sorted((data / "train").glob("*.tar"))
    return {
        "model": {"image": {"config": tower(width, image_layers, "vit"), "pooling": "cls"},
                  "text": {"config": tower(width, text_layers, "bert"), "tokenizer": str(data / "tokenizer"),
                           "context_length": 24, "pooling": "mean"},
                  "embed_dim": width},
        "data": {"train_shards": str(data / "train" / f"{{00000..{len(shards) - 1:05d}}}.tar"), "image_size": 32,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "train_crop_scale": [0.8, 1.0],
                 "shuffle_buffer": 500, "num_workers": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup_steps": max(1, steps // 20), "schedule": "cosine"},
        "train": {"micro_batch_size": 64, "steps": steps, "log_every": max(1, steps // 10), "zero_stage": 2},
        "eval": {"zeroshot_shards": str(data / "classification" / "00000.tar"), "batch_size": 256},
        "output_dir": str(out),
        "seed": seed,
    }


def start(config: dict, path: Path):
    """Launch `python train.py` for `config` (written to `path`) in the background."""
    import os

    path.write_text(yaml.safe_dump(config))
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(path.with_suffix(".log"), "w")
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(path)], cwd=REPO,
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return process, config, path


def finish(job) -> dict:
    """Wait for a started run; its zero-shot top-1, median logged samples/s (after the first window), cache hit rate."""
    process, config, path = job
    if process.wait() != 0:
        raise SystemExit(f"{path} failed; see {path.with_suffix('.log')}")
    out = Path(config["output_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"acc1": metrics.get("zeroshot/acc1"), "samples_per_s": statistics.median(speeds) if speeds else None,
            "hit_rate": next((r["distill/cache_hit_rate"] for r in reversed(records) if "distill/cache_hit_rate" in r), None)}


def train(config: dict, path: Path) -> dict:
    return finish(start(config, path))


def cpu_description() -> str:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}; AVX-512 BF16: {'avx512_bf16' in flags}; AMX: {'amx_tile' in flags}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--train-images", type=int, default=4800)
    parser.add_argument("--held-out", type=int, default=960)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill-weight", type=float, default=1.0, help="the distill objective's weight beside clip: 1.0")
    parser.add_argument("--more-seeds", type=int, nargs="*", default=[],
                        help="student seeds (init, data order) beyond --seed for the accuracy comparison: clip alone vs "
                             "clip + distill per seed, two runs at a time; prints the mean and the paired difference")
    args = parser.parse_args()
    print(cpu_description(), flush=True)
    data = build_shapes(args.work / "shapes", args.train_images, args.held_out)
    results = {}
    teacher_dir = args.work / "teacher"
    if not (teacher_dir / "model" / "model.safetensors").is_file():
        results["teacher"] = train(run_config(data, teacher_dir, 128, 4, 2, args.teacher_steps, args.seed),
                                   args.work / "teacher.yaml")
    else:
        metrics = json.loads((teacher_dir / "metrics.json").read_text())
        results["teacher"] = {"acc1": metrics.get("zeroshot/acc1"), "samples_per_s": None, "hit_rate": None}
    print("teacher", results["teacher"], flush=True)
    distill = {"teacher": str(teacher_dir / "model")}
    cache = args.work / "teacher_cache"
    shutil.rmtree(cache, ignore_errors=True)
    clip, with_teacher = {"clip": 1.0}, {"clip": 1.0, "distill": args.distill_weight}
    cached = {**distill, "cache_dir": str(cache)}
    # Two rounds of concurrent runs: each round's runs share whatever else loads the machine, so
    # their throughput ratios compare like with like. Round 2's warm run reads round 1's cache
    # (the same seed and data order: the same samples) beside a second clip-alone peer.
    rounds = [[("student, clip", clip, None), ("student, clip + distill", with_teacher, distill),
               ("student, clip + distill, cache (cold)", with_teacher, cached)],
              [("student, clip (round 2 peer)", clip, None), ("student, clip + distill, cache (warm)", with_teacher, cached)]]
    for number, runs in enumerate(rounds, 1):
        jobs = []
        for name, objectives, settings in runs:
            out = args.work / name.replace(" ", "_").replace(",", "").replace("+", "plus").replace("(", "").replace(")", "")
            shutil.rmtree(out, ignore_errors=True)
            config = run_config(data, out, 64, 2, 1, args.student_steps, args.seed)
            config["objectives"] = objectives
            if settings:
                config["distill"] = settings
            jobs.append((name, start(config, out.with_suffix(".yaml"))))
        for name, job in jobs:
            results[name] = {**finish(job), "round": number}
            print(name, results[name], flush=True)
    print("\n| run | round | zero-shot top-1 | samples/s | vs clip alone, same round | cache hit rate |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        base = next((v["samples_per_s"] for k, v in results.items() if k.startswith("student, clip") and
                     "distill" not in k and v.get("round") == r.get("round")), None)
        speed = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        ratio = f"{r['samples_per_s'] / base:.2f}x" if r["samples_per_s"] and base and name != "teacher" else "-"
        hits = f"{r['hit_rate']:.0%}" if r["hit_rate"] is not None else "-"
        print(f"| {name} | {r.get('round', '-')} | {r['acc1']:.1%} | {speed} | {ratio} | {hits} |")
    if args.more_seeds:
        results["seeds"] = compare_seeds(args, data, distill, [args.seed, *args.more_seeds], results)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


def compare_seeds(args, data: Path, distill: dict, seeds: list[int], results: dict) -> dict:
    """Zero-shot top-1 of clip alone and clip + distill for each student seed (`--seed`'s from the
    rounds above), and the mean paired gain with its standard error over seeds."""
    table = {args.seed: (results["student, clip"]["acc1"], results["student, clip + distill"]["acc1"])}
    for seed in seeds[1:]:
        jobs = []
        for objectives, settings in (({"clip": 1.0}, None), ({"clip": 1.0, "distill": args.distill_weight}, distill)):
            out = args.work / f"seed{seed}_{'distill' if settings else 'clip'}"
            shutil.rmtree(out, ignore_errors=True)
            config = run_config(data, out, 64, 2, 1, args.student_steps, seed)
            config["objectives"] = objectives
            if settings:
                config["distill"] = settings
            jobs.append(start(config, out.with_suffix(".yaml")))
        table[seed] = tuple(finish(job)["acc1"] for job in jobs)
        print(f"seed {seed}: clip {table[seed][0]:.1%}, clip + distill {table[seed][1]:.1%}", flush=True)
    gains = [with_teacher - alone for alone, with_teacher in table.values()]
    mean_gain = statistics.mean(gains)
    se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else float("nan")
    print("\n| student seed | clip alone | clip + distill | gain |\n|---|---|---|---|")
    for seed, (alone, with_teacher) in table.items():
        print(f"| {seed} | {alone:.1%} | {with_teacher:.1%} | {with_teacher - alone:+.1%} |")
    print(f"| mean | {statistics.mean(a for a, _ in table.values()):.1%} | {statistics.mean(b for _, b in table.values()):.1%} | "
          f"{mean_gain:+.1%} (SE {se:.1%}, {sum(g > 0 for g in gains)}/{len(gains)} seeds gain) |")
    return {"per_seed": {str(k): v for k, v in table.items()}, "mean_gain": mean_gain, "se": se}


if __name__ == "__main__":
    main()
