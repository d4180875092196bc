"""Scoring throughput (issue 26): `mmcl curate score` end to end (read + decode + forward + Parquet
write) in samples/s per rank, next to a plain forward pass of the same model on already-decoded
tensors of the same batch size (the peer), as a ratio.

The data: --shards x --per-shard synthetic samples (random-blob JPEGs of 64-96 x 64 px, short
captions) in img2dataset layout. The model: a small random-init transformers
VisionTextDualEncoder (ViT 192-wide x 4 layers at 64 px, patch 8; BERT-tiny 128-wide x 2
layers), saved with its image processor and tokenizer: what a user would pass as --model.
The command runs as a subprocess with OMP_NUM_THREADS=1 (and `--workers` loader processes);
the peer runs here with one thread; the best of --repeats forward rounds counts.

    python benchmarks/curate_score.py --shards 8 --per-shard 256 --batch-size 64 --workers 1
    python benchmarks/curate_score.py ... --ranks 2      # the command under torchrun, 2 ranks
"""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "tree", "small", "large", "on", "grass"]


def write_data(root: Path, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                width = 64 + 16 * (i % 3)
                base = rng.integers(0, 256, (8, width // 8, 3), dtype=np.uint8)
                image = Image.fromarray(base, "RGB").resize((width, 64), Image.BICUBIC)
                jpeg = io.BytesIO()
                image.save(jpeg, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, 8))
                for ext, data in (("jpg", jpeg.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:03d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def write_model(out: Path) -> Path:
    from transformers import (BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel)

    vision = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=768)
    text = BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                      max_position_embeddings=32)
    torch.manual_seed(0)
    VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=128)
                               ).save_pretrained(out)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)
    return out


def run_score(model: Path, pattern: str, out: Path, batch_size: int, workers: int, ranks: int) -> tuple[list[float], float, str]:
    """(samples/s per rank as the command reports them, wall seconds, command line)."""
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "mmcl"), "curate", "score", "--model", str(model), "--shards", pattern, "--out", str(out),
               "--batch-size", str(batch_size), "--workers", str(workers)]
    if ranks > 1:
        command = [str(bin_dir / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", "29613", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:])
    line = next(l for l in result.stdout.splitlines() if "samples/s per rank" in l)
    print(line, flush=True)
    return [float(x) for x in re.findall(r"rank \d+ ([0-9.]+)", line.split("samples/s per rank:")[1])], wall, " ".join(command)


def forward_rate(model_dir: Path, batch_size: int, samples: int, repeats: int) -> float:
    """Samples/s of encode_image + encode_text on ready tensors (the model as `mmcl curate score` loads it)."""
    from mmcl.curate.score import load_model
    from mmcl.data.tokenize import CaptionTokenizer

    model = load_model(str(model_dir))
    inputs = model.inputs()
    tokenize = CaptionTokenizer(inputs.tokenizer, inputs.context_length)
    pixels = torch.randn(batch_size, 3, inputs.image_size, inputs.image_size)
    ids, mask = tokenize([" ".join(WORDS[:8])] * batch_size)
    batches = max(1, samples // batch_size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            with torch.no_grad():
                image, text = model.encode_image(pixels), model.encode_text(ids, mask)
                (image * text).sum(-1)
        best = min(best, time.perf_counter() - started)
    return batches * batch_size / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pattern = write_data(root / "shards", args.shards, args.per_shard)
        model = write_model(root / "model")
        samples = args.shards * args.per_shard
        rates, wall, command = run_score(model, pattern, root / "scores", args.batch_size, args.workers, args.ranks)
        peer = forward_rate(model, args.batch_size, samples, args.repeats)
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; {samples} samples, batch {args.batch_size}, "
          f"{args.ranks} rank(s) x 1 thread, {args.workers} loader process(es) per rank; command wall {wall:.1f} s "
          "(with start-up)\n")
    print("| | samples/s per rank | ratio to the forward pass |")
    print("|---|---|---|")
    for rank, rate in enumerate(rates):
        print(f"| `mmcl curate score`, rank {rank} (read + decode + forward + write) | {rate:.0f} | {rate / peer:.2f} |")
    print(f"| plain forward (encode_image + encode_text, decoded tensors, 1 thread) | {peer:.0f} | 1.00 |")
    print(f"\ncommand: {command.replace(str(root), '<tmp>')}")


if __name__ == "__main__":
    main()
