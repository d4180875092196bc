"""Cost of NaFlex: forward+backward of the SigLIP 2 NaFlex image tower vs the fixed-resolution tower, per sequence length.

    python benchmarks/naflex_cost.py [--lengths 64 144 256] [--batch 16] [--repeats 7]

For each sequence length N (a square number), three image towers of the same shape (width,
depth, heads, MLP, patch size P; built by mmcl's `build_tower` from inline configs, fp32, the
towers' default attention), timed in one run, in alternation (a, b, c, a, b, c, ...), so
background load hits them alike:

- `fixed`: `SiglipVisionModel` (SigLIP, fixed resolution) at (sqrt(N)*P)^2-px square images:
  exactly N patches, learnt position embeddings for that grid;
- `naflex, mixed aspect`: `Siglip2VisionModel` on a NaFlex batch of images of aspect ratios
  4:1, 2:1, 1:1, 1:2, 1:4 (cycled), made by mmcl's own `NaFlexPatchesU8` + `naflex_batch` at
  `max_num_patches` = N: each image has <= N real patches, padded to N, with the attention mask
  and its grid (position embeddings resized to it per image);
- `naflex, square`: the same tower on square images (every position a real patch).

One step = forward of a batch, the pooled output's mean square as the loss, backward (no
optimizer: it is the same for both). Samples/s and patch tokens/s (B x N positions per second;
"real" counts only unpadded patches) are the median over `--repeats` timed steps after 2 warm-up
steps; ratios are NaFlex / fixed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch  # noqa: E402
from mmcl.models.settings import TowerConfig  # noqa: E402
from mmcl.models.towers import build_tower  # noqa: E402
from naflex_aspect import cpu_line  # noqa: E402

ASPECTS = [(1, 4), (1, 2), (1, 1), (2, 1), (4, 1)]  # (height, width) ratios of the mixed batch


def shape(args: argparse.Namespace) -> dict:
    width = args.width
    return {"hidden_size": width, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "intermediate_size": 4 * width, "patch_size": args.patch, "num_channels": 3}


def naflex_inputs(batch: int, length: int, patch: int, aspects: list[tuple[int, int]]) -> dict:
    """A NaFlex batch through mmcl's transform: images of the given aspect ratios, about 2x the target area."""
    generator = torch.Generator().manual_seed(length)
    transform = NaFlexPatchesU8(patch, length)
    side = int(round(length ** 0.5)) * patch * 2
    items = []
    for index in range(batch):
        tall, wide = aspects[index % len(aspects)]
        scale = (tall * wide) ** -0.5
        height, width = max(patch, int(side * tall * scale)), max(patch, int(side * wide * scale))
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        items.append(transform(image))
    return naflex_batch(items, [0.5] * 3, [0.5] * 3)


def step_fn(tower, inputs: dict):
    def step() -> None:
        pooled = tower(**inputs).pooler_output
        pooled.square().mean().backward()
        tower.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 144, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    print(cpu_line())
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at start; the machine is shared with other "
          f"agents' jobs")
    print(f"towers: width {args.width}, {args.layers} layers, {args.heads} heads, MLP {4 * args.width}, "
          f"patch {args.patch}, batch {args.batch}, fp32")
    rows = []
    for length in args.lengths:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise SystemExit(f"--lengths: {length} is not a square number; the fixed tower needs a square grid.")
        image_size = side * args.patch
        torch.manual_seed(0)
        fixed = build_tower(TowerConfig(config={"model_type": "siglip_vision_model", "image_size": image_size,
                                                **shape(args)}), "image")
        torch.manual_seed(0)
        flexible = build_tower(TowerConfig(config={"model_type": "siglip2_vision_model", "num_patches": length,
                                                   **shape(args)}), "image")
        mixed = naflex_inputs(args.batch, length, args.patch, ASPECTS)
        square = naflex_inputs(args.batch, length, args.patch, [(1, 1)])
        contenders = {
            "fixed (SiglipVisionModel, square)": (step_fn(fixed, {"pixel_values": torch.randn(
                args.batch, 3, image_size, image_size)}), args.batch * length),
            "naflex, mixed aspect (Siglip2VisionModel)": (step_fn(flexible, mixed),
                                                         int(mixed["pixel_attention_mask"].sum())),
            "naflex, square (Siglip2VisionModel)": (step_fn(flexible, square), int(square["pixel_attention_mask"].sum())),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for run in range(args.repeats + 2):
            for name, (step, _) in contenders.items():
                start = time.perf_counter()
                step()
                if run >= 2:
                    times[name].append(time.perf_counter() - start)
        base = args.batch / statistics.median(times["fixed (SiglipVisionModel, square)"])
        for name, (_, real) in contenders.items():
            seconds = statistics.median(times[name])
            rate = args.batch / seconds
            rows.append((length, f"{image_size}x{image_size}", name, rate, args.batch * length / seconds, real / seconds,
                         real / (args.batch * length), rate / base))
        print(f"# N={length} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print("| N (patches) | fixed input | tower | samples/s | patch tokens/s | real patch tokens/s | real share | "
          "ratio vs fixed |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for length, size, name, rate, tokens, real, share, ratio in rows:
        print(f"| {length} | {size} | {name} | {rate:.1f} | {tokens:,.0f} | {real:,.0f} | {100 * share:.0f}% | "
              f"{ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
