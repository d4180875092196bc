"""`mmcl curate reinforce`: write a reinforced store (MobileCLIP's DataCompDR recipe) beside the shards.

    mmcl curate reinforce --teacher T [--teacher T2 ...] --shards PATTERN --augmentations K --out DIR
                          [--seed S] [--crop-scale A B] [--batch-size N] [--workers N] [--overwrite]

Per good sample: K crop boxes and flips drawn from (seed, key) like torchvision's
RandomResizedCrop(scale=crop_scale, ratio=(3/4, 4/3)) on the decoded image (full size), each
teacher's image embedding of every augmentation (the box cropped from the decoded image, resized
to the teacher's image size with antialiased bicubic, flipped if drawn, normalised with the
teacher's mean/std; a SigLIP 2 NaFlex teacher instead sees the flipped box as its own processor
would, resized keeping its aspect ratio to fit its max_num_patches and cut into patches), and each
teacher's text embedding of the first caption. Training with
`distill.store: DIR` replays one stored augmentation per sample and epoch and runs no teacher.

DIR/parts/<i:05d>-<stem>.parquet, one row per good sample in shard order:

    key: string, shard: string (redacted), index: int32,
    boxes: fixed_size_list<float32>[4K]   (top, left, height, width) of each augmentation, as
                                          fractions of the decoded image's height / width
    flips: fixed_size_list<bool>[K]
    image_embedding_<t>: fixed_size_list<float16>[K * D_t]   teacher t's unit embedding of
                                          augmentation k at [k*D_t:(k+1)*D_t]
    text_embedding_<t>: fixed_size_list<float16>[D_t]

DIR/mmcl_curate.json: {"command": "reinforce", "version": 1, "augmentations": K, "seed": S,
"crop_scale": [A, B], "shards": [...], "teachers": [{"name", "sha256", "embedding_dim",
"logit_scale", "image_size" (null for a NaFlex teacher), "naflex" ({patch_size, max_num_patches} or null)}]}. Written by the shard-parallel runner (`mmcl.curate.sharded`):
split over the ranks of a `deepspeed` / `torchrun` launch, resumed by rerunning the command.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcl.curate.sharded import CurateError, ShardJob, check_out, shard_list

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", action="append", required=True, metavar="T",
                        help="a teacher (repeatable; ensembled in training): mmcl model dir / run dir / export, a "
                             "transformers CLIP/SigLIP folder, or openclip:ARCH")
    parser.add_argument("--weights", action="append", default=None, metavar="FILE",
                        help="the n-th openclip:ARCH teacher's checkpoint file (repeatable, in teacher order)")
    parser.add_argument("--openclip-config", action="append", default=None, metavar="JSON",
                        help="the n-th openclip:ARCH teacher's model config, for an architecture open_clip lacks")
    parser.add_argument("--shards", required=True, metavar="PATTERN", help="the shards to reinforce")
    parser.add_argument("--augmentations", type=int, required=True, metavar="K", help="augmentations stored per sample")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for mmcl_curate.json and parts/ (an earlier store of the same job is resumed)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the crop boxes and flips (default 0)")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("A", "B"),
                        help="RandomResizedCrop's area range (default 0.08 1.0, MobileCLIP's)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="data-loading processes per rank (default 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier store of other teachers, shards or augmentations (never another folder)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's


# ----------------------------------------------------------------------------- augmentations


def crop_box(height: int, width: int, scale: Sequence[float], generator: Any) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels: torchvision's `RandomResizedCrop.get_params` drawing from `generator`."""
    import torch

    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed ratio
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_augmentations(seed: int, key: str, k: int, height: int, width: int,
                       scale: Sequence[float]) -> tuple[list[tuple[int, int, int, int]], list[bool]]:
    """The K (box in pixels, flip) of sample `key` on a `height` x `width` image: a function of (seed, key)."""
    import torch

    from mmcl.data.shards import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "reinforce", key) % (2 ** 63))
    boxes, flips = [], []
    for _ in range(k):
        boxes.append(crop_box(height, width, scale, generator))
        flips.append(bool(torch.rand((), generator=generator).item() < 0.5))
    return boxes, flips


class AugmentedCrops:
    """uint8 [3, H, W] + key -> float32 [5K + sum_t K*V_t]: the K boxes as fractions (4K), the flips
    (K, 0/1), then per teacher t its K views, flipped and normalised with its mean/std: a square teacher's
    crop at S_t x S_t (V_t = 3*S_t*S_t), a NaFlex teacher's packed patches of the box at its own aspect
    ratio (`NaFlexEvalTransform`: V_t = (N_t + 1) * 3*P_t*P_t, unpacked by `unpack_naflex`).

    One flat vector so the data path stacks it like any transform output (`samples.collate`).
    """

    def __init__(self, seed: int, k: int, scale: Sequence[float], teachers: list[TeacherView]):
        self.seed, self.k, self.scale = int(seed), int(k), (float(scale[0]), float(scale[1]))
        self.teachers = list(teachers)

    def __call__(self, image: Any, key: str) -> Any:
        import torch

        height, width = int(image.shape[-2]), int(image.shape[-1])
        boxes, flips = draw_augmentations(self.seed, key, self.k, height, width, self.scale)
        parts = [torch.tensor([[t / height, l / width, h / height, w / width] for t, l, h, w in boxes],
                              dtype=torch.float32).reshape(-1), torch.tensor(flips, dtype=torch.float32)]
        for view in self.teachers:
            for (top, left, h, w), flip in zip(boxes, flips):
                parts.append(view(image, (top, left, h, w), flip).reshape(-1))
        return torch.cat(parts)


class TeacherView:
    """One teacher's view of a crop box: `(uint8 [3, H, W], (top, left, h, w), flip) -> float32 tensor` of a
    fixed size `width` — a square crop at `size` (bicubic, antialiased), or with `naflex = (P, N)` the box
    as the teacher's Siglip2ImageProcessor sees it, packed as `NaFlexEvalTransform` packs it."""

    def __init__(self, size: int | None, mean: Sequence[float], std: Sequence[float],
                 naflex: tuple[int, int] | None = None):
        self.size, self.mean, self.std, self.naflex = size, tuple(mean), tuple(std), naflex
        if naflex is not None:
            from mmcl.data.naflex import NaFlexEvalTransform

            self.patches = NaFlexEvalTransform(naflex[0], naflex[1], mean, std)

    @property
    def width(self) -> int:
        if self.naflex is not None:
            return (self.naflex[1] + 1) * 3 * self.naflex[0] ** 2
        return 3 * int(self.size) ** 2

    def __call__(self, image: Any, box: tuple[int, int, int, int], flip: bool) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        if self.naflex is not None:  # the whole box, its aspect kept: the processor resizes it
            crop = F.crop(image, *box)
            return self.patches(F.horizontal_flip(crop) if flip else crop)
        crop = F.resized_crop(image, *box, [self.size, self.size], interpolation=F.InterpolationMode.BICUBIC,
                              antialias=True)
        if flip:
            crop = F.horizontal_flip(crop)
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (crop.float() / 255.0 - mean_t) / std_t

    def encode(self, teacher: Any, views: Any) -> Any:
        """[M, width] views -> [M, D_t] the teacher's unit image embeddings."""
        if self.naflex is not None:
            from mmcl.data.naflex import unpack_naflex

            patch_width = 3 * self.naflex[0] ** 2
            return teacher.encode_image(**unpack_naflex(views.reshape(views.shape[0], -1, patch_width)))
        return teacher.encode_image(views.reshape(views.shape[0], 3, self.size, self.size))


def teacher_view(teacher: Any) -> TeacherView:
    """The view a loaded teacher (`mmcl.objectives.teacher.Teacher`) takes of each crop box."""
    inputs = teacher.inputs()
    if inputs.naflex is not None:
        return TeacherView(None, inputs.mean, inputs.std, naflex=(int(inputs.naflex[0]), int(inputs.naflex[1])))
    return TeacherView(int(inputs.image_size), inputs.mean, inputs.std)


# ----------------------------------------------------------------------------- the job


def schema(k: int, dims: list[int]) -> Any:
    import pyarrow as pa

    fields = [("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
              ("boxes", pa.list_(pa.float32(), 4 * k)), ("flips", pa.list_(pa.bool_(), k))]
    for t, dim in enumerate(dims):
        fields += [(f"image_embedding_{t}", pa.list_(pa.float16(), k * dim)), (f"text_embedding_{t}", pa.list_(pa.float16(), dim))]
    return pa.schema(fields)


def check_arguments(args: argparse.Namespace) -> tuple[list[tuple[str, str | None, str | None]], list[str]]:
    """The cheap checks, before torch: ([(teacher spec, weights, openclip config)], shard URLs)."""
    from mmcl.curate.score import model_spec

    if args.augmentations < 1:
        raise CurateError(f"--augmentations must be at least 1, got {args.augmentations}.")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise CurateError(f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]} must satisfy 0 < A <= B <= 1.")
    if args.batch_size < 1 or args.workers < 0:
        raise CurateError("--batch-size must be at least 1 and --workers 0 or more.")
    check_out(args.out, "reinforce")
    urls = shard_list(args.shards)
    weights, configs = list(args.weights or []), list(args.openclip_config or [])
    openclip = sum(t.startswith("openclip:") for t in args.teacher)
    if len(weights) > openclip or len(configs) > openclip:
        raise CurateError(f"--weights / --openclip-config apply to openclip:ARCH teachers, in order; {openclip} given, "
                          f"with {len(weights)} --weights and {len(configs)} --openclip-config.")
    teachers = []
    for spec in args.teacher:
        spec = model_spec(spec)
        if spec.startswith("openclip:"):
            teachers.append((spec, weights.pop(0) if weights else None, configs.pop(0) if configs else None))
        else:
            teachers.append((spec, None, None))
    return teachers, urls


def reinforce_job(teachers: list[Any], specs: list[str], urls: list[str], out: str | Path, k: int, seed: int,
                  crop_scale: Sequence[float], batch_size: int) -> ShardJob:
    """The ShardJob writing the store of `teachers` (loaded from `specs`) over `urls` into `out`."""
    import numpy as np
    import torch

    from mmcl.data.samples import SampleSpec
    from mmcl.data.tokenize import CaptionTokenizer
    from mmcl.redact import redact

    tokenizers = [CaptionTokenizer(t.inputs().tokenizer, t.inputs().context_length) for t in teachers]
    dims = [int(t.encode_text(*tok(["a"])).shape[-1]) for t, tok in zip(teachers, tokenizers)]
    views = [teacher_view(t) for t in teachers]
    shards = [redact(url) for url in urls]

    def rows(batch: dict[str, Any]) -> dict[str, Any]:
        packed = batch["pixel_values"]  # [B, 5K + sum_t K*V_t]
        n = packed.shape[0]
        columns: dict[str, Any] = {
            "key": batch["keys"], "shard": [shards[batch["_shard"]]] * n, "index": batch["indices"],
            "boxes": packed[:, :4 * k].numpy().astype(np.float32),
            "flips": (packed[:, 4 * k:5 * k] > 0.5).numpy().reshape(-1)}
        captions = [c[0] for c in batch["captions"]]
        offset = 5 * k
        for t, (teacher, tokenize, view) in enumerate(zip(teachers, tokenizers, views)):
            width = k * view.width
            crops = packed[:, offset:offset + width].reshape(n * k, view.width)
            offset += width
            with torch.no_grad():
                image = view.encode(teacher, crops).float().reshape(n, -1)
                text = teacher.encode_text(*tokenize(captions)).float()
            columns[f"image_embedding_{t}"] = image.cpu().numpy().astype(np.float16)
            columns[f"text_embedding_{t}"] = text.cpu().numpy().astype(np.float16)
        return columns

    import pyarrow as pa

    store_schema = schema(k, dims)
    flips_type = store_schema.field("flips").type

    def rows_arrow(batch: dict[str, Any]) -> dict[str, Any]:
        columns = rows(batch)
        columns["flips"] = pa.FixedSizeListArray.from_arrays(pa.array(columns["flips"], type=pa.bool_()), flips_type.list_size)
        return columns

    manifest = {"augmentations": int(k), "seed": int(seed), "crop_scale": [float(crop_scale[0]), float(crop_scale[1])],
                "shards": shards,
                "teachers": [{"name": redact(spec), "sha256": t.sha256, "embedding_dim": dim,
                              "logit_scale": float(t.logit_scale), "image_size": view.size,
                              "naflex": ({"patch_size": view.naflex[0], "max_num_patches": view.naflex[1]}
                                         if view.naflex is not None else None)}
                             for spec, t, dim, view in zip(specs, teachers, dims, views)]}
    transform = AugmentedCrops(seed, k, crop_scale, views)
    return ShardJob(
        command="reinforce", out=Path(out), urls=urls, manifest=manifest, schema=store_schema,
        sample=SampleSpec(image_transform=transform, caption_key="txt", all_captions=True, first_caption=True,
                          indices=True, keyed_transform=True),
        rows=rows_arrow, batch_size=batch_size, what="a reinforced store")


def main(args: argparse.Namespace) -> int:
    """`mmcl curate reinforce`: checks, teachers, process group, this rank's shards, summary."""
    from mmcl.curate import sharded
    from mmcl.curate.score import load_model

    specs, urls = check_arguments(args)
    device = sharded.device_for_rank()
    teachers = [load_model(spec, weights, config, option="--teacher").to(device) for spec, weights, config in specs]
    job = reinforce_job(teachers, [s for s, _, _ in specs], urls, args.out, args.augmentations, args.seed,
                        args.crop_scale, args.batch_size)
    plan = sharded.plan_out(job, args.overwrite)
    sharded.join_process_group(device)
    sharded.run(job, plan, workers=args.workers, label="reinforced")
    sharded.leave_process_group()
    return 0
