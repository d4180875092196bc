"""A test helper that writes a reinforced store (`distill.store`) exactly in the format of
docs/guides/curation.md ("Distilling from a store"): `mmcl_curate.json` and one Parquet part per
shard, with real teachers' embeddings of the stored crops.

    write_store(out, "shards/{00000..00003}.tar", [teacher_dir], augmentations=3, seed=5)

It reads the tars with `tarfile` and decodes images with PIL (not mmcl's pipeline), draws the
K boxes and flips per sample from derive_seed(seed, "reinforce", key) as torchvision's
RandomResizedCrop does, crops and resizes each box at the teacher's size and encodes it with the
teacher (`mmcl.objectives.teacher.load_teacher`, the online teacher's own code). `draw` replaces
the drawing, e.g. to store the very crops an online run's student saw. This independent writer
is what the unit tests check the reader against; `build_store` (the e2e tests, the benchmark)
writes the store with the real `mmcl curate reinforce` instead.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.v2 import functional as F

Draw = Callable[[str, torch.Tensor], list[tuple[int, int, int, int, bool]]]  # key, image -> K (top, left, h, w, flip)


def build_store(out: Path, shards: str, teachers: list[Path], augmentations: int, seed: int,
                crop_scale: tuple[float, float] = (0.08, 1.0), workers: int = 0) -> Path:
    """The store the e2e tests and the benchmark train from, written by `mmcl curate reinforce`."""
    from mmcl.cli import main

    argv = ["curate", "reinforce", "--shards", shards, "--augmentations", str(augmentations), "--out", str(out),
            "--seed", str(seed), "--crop-scale", str(crop_scale[0]), str(crop_scale[1]), "--workers", str(workers)]
    for teacher in teachers:
        argv += ["--teacher", str(teacher)]
    status = main(argv)
    if status:
        raise RuntimeError(f"mmcl curate reinforce failed with status {status}")
    return out


def tar_samples(path: str) -> list[dict]:
    """A shard's samples in tar order: {"__key__", ext: bytes} (consecutive members sharing a key)."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if not samples or samples[-1]["__key__"] != key or ext in samples[-1]:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


def image_tensor(data: bytes) -> torch.Tensor:
    """Image bytes -> RGB uint8 [3, H, W] through PIL."""
    array = np.array(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def first_caption(data: bytes) -> str:
    text = data.decode("utf-8").strip()
    if text.startswith("["):
        return json.loads(text)[0].strip()
    return text


def random_draw(seed: int, augmentations: int, crop_scale, flip_p: float) -> Draw:
    """K boxes of torchvision's RandomResizedCrop(scale=crop_scale, ratio=(3/4, 4/3)) and flips with
    probability flip_p, from torch's generator seeded by derive_seed(seed, "reinforce", key)."""
    from mmcl.data.shards import derive_seed

    def draw(key: str, image: torch.Tensor) -> list[tuple[int, int, int, int, bool]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "reinforce", key) % 2**63)
            out = []
            for _ in range(augmentations):
                top, left, height, width = T.RandomResizedCrop.get_params(image, list(crop_scale), [3 / 4, 4 / 3])
                out.append((top, left, height, width, bool(torch.rand(()) < flip_p)))
        return out

    return draw


def write_store(out: Path, shards: str, teachers: list[Path], augmentations: int, seed: int,
                crop_scale=(0.08, 1.0), flip_p: float = 0.5, draw: Draw | None = None,
                leave_out: set[str] = frozenset()) -> Path:
    """Write the store of `shards` (a pattern) to `out`; samples whose key is in `leave_out` get no row."""
    from mmcl.data.shards import expand_shards
    from mmcl.data.tokenize import CaptionTokenizer
    from mmcl.objectives.settings import DistillConfig
    from mmcl.objectives.teacher import load_teacher
    from mmcl.redact import redact

    out = Path(out)
    (out / "parts").mkdir(parents=True)
    loaded = [load_teacher(DistillConfig(teacher=str(path))) for path in teachers]
    urls = [url for source in expand_shards(shards) for url in source]
    draw = draw or random_draw(seed, augmentations, crop_scale, flip_p)
    manifest = {"command": "reinforce", "version": 1, "augmentations": augmentations, "seed": seed,
                "crop_scale": [float(crop_scale[0]), float(crop_scale[1])], "shards": [redact(u) for u in urls],
                "teachers": [{"name": str(path), "sha256": t.sha256, "embedding_dim": int(t.encode_text(
                    *CaptionTokenizer(t.inputs().tokenizer, t.inputs().context_length)(["a"])).shape[1]),
                    "logit_scale": t.logit_scale, "image_size": t.inputs().image_size}
                    for path, t in zip(teachers, loaded)]}
    for i, url in enumerate(urls):
        rows: dict[str, list] = {"key": [], "shard": [], "index": [], "boxes": [], "flips": []}
        images: list[list[np.ndarray]] = [[] for _ in loaded]
        texts: list[list[np.ndarray]] = [[] for _ in loaded]
        samples = tar_samples(url)
        for index, sample in enumerate(samples):
            key = sample["__key__"]
            if key in leave_out:
                continue
            image = image_tensor(sample.get("png") or sample["jpg"])
            _, height, width = image.shape
            crops = draw(key, image)
            rows["key"].append(key)
            rows["shard"].append(redact(url))
            rows["index"].append(index)
            rows["boxes"].append([v for top, left, h, w, _ in crops for v in (top / height, left / width, h / height, w / width)])
            rows["flips"].append([flip for *_, flip in crops])
            for t, teacher in enumerate(loaded):
                inputs = teacher.inputs()
                views = []
                for top, left, h, w, flip in crops:
                    view = F.resized_crop(image, top, left, h, w, [inputs.image_size] * 2,
                                          interpolation=F.InterpolationMode.BICUBIC, antialias=True)
                    views.append(F.horizontal_flip(view) if flip else view)
                mean = torch.tensor(inputs.mean).view(1, 3, 1, 1)
                std = torch.tensor(inputs.std).view(1, 3, 1, 1)
                pixels = (torch.stack(views).float() / 255 - mean) / std
                images[t].append(teacher.encode_image(pixels).reshape(-1).numpy())
                ids, mask = CaptionTokenizer(inputs.tokenizer, inputs.context_length)([first_caption(sample["txt"])])
                texts[t].append(teacher.encode_text(ids, mask)[0].numpy())
        columns = {
            "key": pa.array(rows["key"], pa.string()),
            "shard": pa.array(rows["shard"], pa.string()),
            "index": pa.array(rows["index"], pa.int32()),
            "boxes": fixed_list(np.asarray(rows["boxes"], np.float32).reshape(-1), 4 * augmentations, pa.float32()),
            "flips": fixed_list(np.asarray(rows["flips"], np.bool_).reshape(-1), augmentations, pa.bool_()),
        }
        for t, teacher_info in enumerate(manifest["teachers"]):
            width = teacher_info["embedding_dim"]
            columns[f"image_embedding_{t}"] = fixed_list(np.asarray(images[t], np.float16).reshape(-1),
                                                         augmentations * width, pa.float16())
            columns[f"text_embedding_{t}"] = fixed_list(np.asarray(texts[t], np.float16).reshape(-1), width, pa.float16())
        table = pa.table(columns).replace_schema_metadata(
            {"mmcl": json.dumps({"skips": {}, "samples": len(samples)})})
        stem = os.path.basename(url).rsplit(".tar", 1)[0]
        final = out / "parts" / f"{i:05d}-{stem}.parquet"
        temporary = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)
    (out / "mmcl_curate.json").write_text(json.dumps(manifest, indent=1))
    return out


def fixed_list(values: np.ndarray, size: int, kind: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values, kind), size)
