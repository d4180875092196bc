"""`mmcl curate score`: every sample's image-text similarity and embeddings under a model.

    mmcl curate score --model M --shards PATTERN --out DIR [--batch-size N] [--workers N] [--overwrite]

M is an mmcl model directory (or a run directory holding model/), an mmcl export, a
`transformers` CLIP / SigLIP / VisionTextDualEncoder folder (what `mmcl convert openclip`
writes), or `openclip:ARCH` with `--weights FILE` [`--openclip-config JSON`]. Images get the
model's own evaluation transform (shorter side to its image size, bicubic, centre crop, its
mean/std); the first caption of each sample is tokenized by its own tokenizer.

DIR/parts/<i:05d>-<stem>.parquet holds one row per good sample of shard i, in shard order:

    key: string, shard: string (redacted URL), index: int32 (position in the shard),
    caption: string, score: float32 (cosine similarity of the unit image and text embeddings,
    computed in float32), image_embedding / text_embedding: fixed_size_list<float16>[D] (unit rows)

and DIR/mmcl_curate.json the manifest (model, its weights' SHA-256, D, shards, transform).
The job runs on the shard-parallel runner (`mmcl.curate.sharded`): under `deepspeed` /
`torchrun` the shards are split over ranks; rerunning the command resumes a killed job.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmcl.curate.sharded import CurateError, ShardJob, check_out, shard_list

SCHEMA_FIELDS = ("key", "shard", "index", "caption", "score", "image_embedding", "text_embedding")


def schema(dim: int) -> Any:
    """The parts' columns (ISSUE 26's scores folder), D = `dim`."""
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()), ("caption", pa.string()),
        ("score", pa.float32()), ("image_embedding", pa.list_(pa.float16(), dim)),
        ("text_embedding", pa.list_(pa.float16(), dim)),
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M",
                        help="mmcl model dir / run dir / export, a transformers CLIP/SigLIP folder, or openclip:ARCH")
    parser.add_argument("--weights", default=None, metavar="FILE", help="openclip:ARCH: its checkpoint file")
    parser.add_argument("--openclip-config", default=None, metavar="JSON",
                        help="openclip:ARCH: a model config registering an architecture open_clip lacks (its stem is the name)")
    parser.add_argument("--shards", required=True, metavar="PATTERN", help="the shards to score, e.g. 'data/{00000..00127}.tar'")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for mmcl_curate.json and parts/ (an earlier score folder of the same job is resumed)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="data-loading processes per rank (default 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier score folder of another model or shard list (never another folder)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's


def model_spec(spec: str) -> str:
    """`spec`, or its model/ folder when it is a run directory; a missing local path is a CurateError."""
    from mmcl.model_dir import model_location

    location = model_location(spec)
    if location is None:
        raise CurateError(f"--model '{spec}' does not exist; pass an mmcl model directory or export, a transformers "
                          "CLIP/SigLIP folder, or openclip:ARCH with --weights.")
    return location


def check_arguments(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The cheap checks, before torch: (model spec, shard URLs)."""
    if args.batch_size < 1:
        raise CurateError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.workers < 0:
        raise CurateError(f"--workers must be 0 or more, got {args.workers}.")
    check_out(args.out, "score")
    urls = shard_list(args.shards)
    spec = model_spec(args.model)
    if spec.startswith("openclip:") and args.weights is not None and not Path(args.weights).is_file():
        raise CurateError(f"--weights '{args.weights}' is not a file.")
    return spec, urls


def load_model(spec: str, weights: str | None = None, openclip_config: str | None = None, option: str = "--model") -> Any:
    """The model as a frozen `mmcl.objectives.teacher.Teacher` (encode_image / encode_text / inputs())."""
    from transformers.utils import logging as transformers_logging

    from mmcl.objectives.teacher import OptionNames, TeacherLoadError, load_image_text_model

    transformers_logging.disable_progress_bar()  # a command's output is its own progress lines
    try:
        return load_image_text_model(spec, weights, openclip_config,
                                     OptionNames(option, "--weights", "--openclip-config"))
    except TeacherLoadError as error:
        raise CurateError(str(error)) from None


def eval_transform(model: Any) -> dict[str, Any]:
    """The manifest's record of the image transform the model gets."""
    inputs = model.inputs()
    if inputs.naflex is not None:  # a SigLIP 2 model: its own NaFlex patches of the whole image
        return {"resize": "aspect ratio kept, patch grid fits max_num_patches, bilinear, antialiased", "crop": "none",
                "patch_size": inputs.naflex[0], "max_num_patches": inputs.naflex[1],
                "mean": list(inputs.mean), "std": list(inputs.std)}
    return {"resize": "shorter side, bicubic, antialiased", "crop": "centre", "image_size": inputs.image_size,
            "mean": list(inputs.mean), "std": list(inputs.std)}


def score_job(model: Any, spec: str, urls: list[str], out: str | Path, batch_size: int) -> ShardJob:
    """The ShardJob that scores `urls` with `model` (loaded from `spec`) into `out`."""
    import numpy as np
    import torch

    from mmcl.data.samples import SampleSpec
    from mmcl.data.tokenize import CaptionTokenizer
    from mmcl.data.transforms import ResizeCenterCropU8
    from mmcl.objectives.teacher import naflex_transform
    from mmcl.redact import redact

    inputs = model.inputs()
    dim = int(model.encode_text(*CaptionTokenizer(inputs.tokenizer, inputs.context_length)(["a"])).shape[-1])
    shards = [redact(url) for url in urls]

    def rows(batch: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            naflex = {key: batch[key] for key in ("pixel_attention_mask", "spatial_shapes") if key in batch}
            image = model.encode_image(batch["pixel_values"], **naflex).float()
            text = model.encode_text(batch["input_ids"], batch["attention_mask"]).float()
        score = (image * text).sum(-1)
        return {"key": batch["keys"], "shard": [shards[batch["_shard"]]] * len(batch["keys"]),
                "index": batch["indices"], "caption": [c[0] for c in batch["captions"]],
                "score": score.cpu().numpy().astype(np.float32),
                "image_embedding": image.cpu().numpy().astype(np.float16),
                "text_embedding": text.cpu().numpy().astype(np.float16)}

    manifest = {"model": redact(spec), "model_sha256": model.sha256, "embedding_dim": dim, "shards": shards,
                "transform": eval_transform(model)}
    return ShardJob(
        command="score", out=Path(out), urls=urls, manifest=manifest, schema=schema(dim),
        sample=SampleSpec(image_transform=naflex_transform(inputs) or ResizeCenterCropU8(inputs.image_size),
                          caption_key="txt", all_captions=True,
                          first_caption=True, indices=True),
        rows=rows, batch_size=batch_size, tokenize=CaptionTokenizer(inputs.tokenizer, inputs.context_length),
        mean=tuple(inputs.mean), std=tuple(inputs.std),
        identity=("model_sha256", "embedding_dim", "shards", "transform"), what="scores")


def main(args: argparse.Namespace) -> int:
    """`mmcl curate score`: checks, model, process group, this rank's shards, summary."""
    from mmcl.curate import sharded

    spec, urls = check_arguments(args)
    model = load_model(spec, args.weights, args.openclip_config)
    device = sharded.device_for_rank()
    model.to(device)
    job = score_job(model, spec, urls, args.out, args.batch_size)
    plan = sharded.plan_out(job, args.overwrite)
    sharded.join_process_group(device)
    sharded.run(job, plan, workers=args.workers, label="scored")
    sharded.leave_process_group()
    return 0
