"""Data pipeline throughput: mmcl vs OpenCLIP's WebDataset pipeline, same shards, same run.

Decoded + augmented (224-px bicubic random-resized crop, scale 0.9-1.0, CLIP normalisation) +
tokenised (OpenCLIP's SimpleTokenizer, 77 tokens) samples per second, delivered to the main
process as batches of 64, with 1 and 2 DataLoader workers, on synthetic photo-like JPEGs
(smooth random colour fields + gradient + grain, 256 px shorter side, quality 90).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_pipeline.py [--images 2000] [--workers 1 2] [--repeats 3]
        [--tables open_clip naflex] [--naflex-patches 256] [--naflex-patch-size 16]

Timing starts when the first batch arrives (worker start-up and shuffle-buffer warm-up
excluded) and stops at the end of the epoch. Each configuration runs `--repeats` times,
alternating pipelines, and the best run is reported.

OpenCLIP: `open_clip_train.data.get_wds_dataset` with a minimal args namespace and
`open_clip.image_transform(224, is_train=True)`. Its loader fails under webdataset 1.x
(`KeyError: 'fname'`: `tar_file_expander` now yields an empty end-of-shard marker that its
`group_by_keys_nothrow` does not expect); this script patches that in memory by dropping the
markers before grouping (never in site-packages) and says so in its output.

`--tables naflex` (SigLIP 2 / NaFlex, issue 27): mmcl's loader with `data.naflex` (each image
resized keeping its aspect ratio to fit `--naflex-patches` patches of `--naflex-patch-size` px,
patchified by `NaFlexPatchesU8`, padded and normalised per batch by `naflex_batch`) vs mmcl's
square transform with the same number of patches (RandomResizedCrop to sqrt(N)*P px, 256 px for
256 patches of 16), same shards, same tokenizer, alternating; ratio NaFlex / square per worker count.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcl.config import DataConfig  # noqa: E402
from mmcl.data.settings import NaFlexConfig  # noqa: E402
from mmcl.data import build_train_loader  # noqa: E402

BATCH = 64
WORDS = "a photo of the red blue green small large cat dog car tree house street beach mountain river".split()


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field + a gradient + grain: compresses and decodes like a photo."""
    small = rng.integers(0, 256, (rng.integers(4, 10), rng.integers(4, 10), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    ramp = np.linspace(-40, 40, width, dtype=np.float32)[None, :, None] * rng.uniform(-1, 1, 3)
    grain = rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(field + ramp + grain, 0, 255).astype(np.uint8))


def write_shards(root: Path, images: int, shards: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    per_shard = -(-images // shards)
    sizes, index = {}, 0
    for s in range(shards):
        name = f"{s:05d}.tar"
        count = 0
        with tarfile.open(root / name, "w") as tar:
            while count < per_shard and index < images:
                width, height = [(341, 256), (256, 341), (256, 256), (384, 256)][index % 4]
                out = io.BytesIO()
                photo_like(rng, width, height).save(out, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, rng.integers(5, 15)))
                for ext, data in (("jpg", out.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": f"{index:09d}"}).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
                index += 1
        sizes[name] = count
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def patch_open_clip() -> str:
    import open_clip_train.data as ocd

    original = ocd.tar_file_expander

    def tar_file_expander_without_eof_markers(data, handler=None, **kw):
        # webdataset 1.x yields `{}` at each shard end; open_clip's group_by_keys_nothrow reads
        # sample["fname"] unconditionally. Drop the markers (its grouping splits shards by key anyway).
        return (s for s in original(data, handler=handler, **kw) if s)

    ocd.tar_file_expander = tar_file_expander_without_eof_markers
    return "patched open_clip_train.data.tar_file_expander in memory to drop webdataset 1.x end-of-shard markers"


def open_clip_loader(pattern: str, images: int, workers: int, tokenizer):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(
        train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=images,
        train_data_upsampling_factors=None, seed=0, batch_size=BATCH, workers=workers, world_size=1,
    )
    preprocess = open_clip.image_transform(224, is_train=True)
    return get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def mmcl_loader(pattern: str, workers: int, tokenizer):
    cfg = DataConfig(train_shards=pattern, num_workers=workers, image_size=224, shuffle_buffer=1000)
    return build_train_loader(cfg, tokenizer, 77, batch_size=BATCH, seed=0, rank=0, world_size=1)


def mmcl_naflex_loader(pattern: str, workers: int, tokenizer, patches: int, patch_size: int):
    cfg = DataConfig(train_shards=pattern, num_workers=workers, shuffle_buffer=1000,
                     naflex=NaFlexConfig(patch_size=patch_size, max_num_patches=patches))
    return build_train_loader(cfg, tokenizer, 77, batch_size=BATCH, seed=0, rank=0, world_size=1)


def mmcl_square_loader(pattern: str, workers: int, tokenizer, image_size: int):
    cfg = DataConfig(train_shards=pattern, num_workers=workers, image_size=image_size, shuffle_buffer=1000)
    return build_train_loader(cfg, tokenizer, 77, batch_size=BATCH, seed=0, rank=0, world_size=1)


def naflex_rows(pattern: str, args, tokenizer) -> list[tuple]:
    """(transform, workers, samples/s, per worker, ratio vs square), best of `--repeats` alternating runs."""
    side = int(round(args.naflex_patches ** 0.5)) * args.naflex_patch_size
    names = (f"square RandomResizedCrop {side}x{side} ({args.naflex_patches} patches)",
             f"NaFlex <= {args.naflex_patches} patches of {args.naflex_patch_size} px")
    rows = []
    for workers in args.workers:
        best = dict.fromkeys(names, 0.0)
        for _ in range(args.repeats):
            best[names[0]] = max(best[names[0]], measure(mmcl_square_loader(pattern, workers, tokenizer, side),
                                                         lambda b: len(b["keys"])))
            best[names[1]] = max(best[names[1]], measure(
                mmcl_naflex_loader(pattern, workers, tokenizer, args.naflex_patches, args.naflex_patch_size),
                lambda b: len(b["keys"])))
        for name in names:
            rows.append((name, workers, best[name], best[name] / workers, best[name] / best[names[0]]))
    return rows


def measure(loader, images_of) -> float:
    """Samples/s after the first batch, over one epoch."""
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += images_of(batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tables", nargs="+", choices=["open_clip", "naflex"], default=["open_clip"],
                        help="open_clip: mmcl vs OpenCLIP; naflex: mmcl's NaFlex transform vs its square one")
    parser.add_argument("--naflex-patches", type=int, default=256)
    parser.add_argument("--naflex-patch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # SimpleTokenizer: bundled BPE vocab, no download
    note = patch_open_clip()
    print(f"# {note}")
    print(f"# python {platform.python_version()}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pattern = write_shards(Path(tmp), args.images, args.shards)
        print(f"# wrote {args.images} JPEGs in {args.shards} shards in {time.perf_counter() - start:.1f}s")
        if "naflex" in args.tables:
            from naflex_aspect import cpu_line

            print(f"# {cpu_line()}; the machine is shared with other agents' jobs")
            naflex = naflex_rows(pattern, args, tokenizer)
            print()
            print("| transform (mmcl loader) | workers | samples/s | samples/s/worker | ratio vs square |")
            print("|---|---:|---:|---:|---:|")
            for name, workers, rate, per_worker, ratio in naflex:
                print(f"| {name} | {workers} | {rate:.0f} | {per_worker:.0f} | {ratio:.2f}x |")
        if "open_clip" not in args.tables:
            return
        rows = []
        for workers in args.workers:
            best = {"open_clip": 0.0, "mmcl": 0.0}
            for _ in range(args.repeats):
                best["open_clip"] = max(best["open_clip"], measure(
                    open_clip_loader(pattern, args.images, workers, tokenizer), lambda b: len(b[0])))
                best["mmcl"] = max(best["mmcl"], measure(
                    mmcl_loader(pattern, workers, tokenizer), lambda b: len(b["keys"])))
            for name in ("open_clip", "mmcl"):
                rows.append((name, workers, best[name], best[name] / workers, best[name] / best["open_clip"]))
    print()
    print("| pipeline | workers | samples/s | samples/s/worker | ratio vs open_clip |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, rate, per_worker, ratio in rows:
        print(f"| {name} | {workers} | {rate:.0f} | {per_worker:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
