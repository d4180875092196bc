"""Evaluation inputs: WebDataset shards, a `datasets` dataset on disk, or an image folder.

Every loader yields batches {"pixel_values": [B, 3, H, W], "index": [B] (dataset order),
"label": [B] (classification data) and/or "captions": list of B lists of strings}, and
splits the samples over ranks and DataLoader workers without overlap, so
`features.extract_features` can gather them back in dataset order.

Shards follow img2dataset's layout: `{key}.jpg|jpeg|png|webp` + `{key}.cls` (integer
label) and/or `{key}.txt` (one caption, or a JSON list of captions for COCO-style data).
Samples that cannot be decoded are skipped and counted by reason (`EvalLoader.skipped`), with
the training pipeline's decoders and reasons (`mmcl.data.decode`); members above the byte
limits are not read.
"""
from __future__ import annotations

import glob
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmcl.data.decode import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_TEXT_BYTES,
    IMAGE_EXTENSIONS,
    BadSample,
    caption_list,
    decode_image,
    decode_label,
    member_bytes,
    to_rgb,
)
from mmcl.distributed import get_rank, get_world_size

ImageTransform = Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W]
_BAD = "__bad__"
_SHARD_BITS = 32  # index = shard number << 32 | position in shard: sorts in dataset order


def expand_shards(spec: str) -> list[str]:
    """Shard list from a brace pattern (`data/{00000..00009}.tar`), a glob, a directory of
    .tar files, or several of those joined by `::`. Raises if no local shard exists."""
    import braceexpand

    from mmcl.data.shards import refuse_pipes
    from mmcl.redact import redact

    refuse_pipes(spec, "the shard")
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            urls.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
            continue
        for url in braceexpand.braceexpand(part):
            if any(ch in url for ch in "*?[") and "://" not in url:
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if not urls or len(local_missing) == len(urls):
        raise FileNotFoundError(f"no shards found for '{redact(spec)}'; give a directory of .tar files or a pattern like dir/{{00000..00009}}.tar.")
    if local_missing:
        raise FileNotFoundError(f"shard {redact(local_missing[0])} (from '{redact(spec)}') does not exist.")
    return urls


def _slot() -> tuple[int, int]:
    """(this reader's slot, number of slots) over ranks x DataLoader workers."""
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
    return get_rank() * workers + worker_id, get_world_size() * workers


def _parse_sample(files: dict[str, Any], transform: ImageTransform, max_pixels: int) -> dict:
    """Decode one grouped sample into {"pixel_values", "label"?, "captions"?}; raises only BadSample."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None:
        raise BadSample("missing_image")
    out: dict[str, Any] = {}
    if "txt" in files:
        try:
            out["captions"] = caption_list(member_bytes(files["txt"], "txt"))
        except BadSample:
            raise
        except Exception as error:
            raise BadSample("bad_caption", f"{type(error).__name__}: {error}") from error
    if "cls" in files:
        out["label"] = decode_label(member_bytes(files["cls"], "cls"))
    image = decode_image(member_bytes(files[image_ext], image_ext), max_pixels)
    try:
        out["pixel_values"] = transform(image)
    except Exception as error:
        raise BadSample("transform_error", f"{type(error).__name__}: {error}") from error
    return out


def member_limits(max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                  max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Callable[[str], int | None]:
    """What the shard reader reads of a member: images and text up to these limits (the run's
    data.max_image_bytes / data.max_text_bytes, or the defaults), nothing else."""

    def limit(extension: str) -> int | None:
        if extension in IMAGE_EXTENSIONS:
            return max_image_bytes
        return max_text_bytes if extension in ("txt", "cls") else None

    return limit


class ShardDataset(IterableDataset):
    """Iterates the samples of `urls` in order; each (rank, worker) slot takes its share.

    With at least as many shards as slots, whole shards are dealt out (shard s to slot
    s % slots); otherwise every slot reads every shard and keeps samples p % slots == slot.
    """

    def __init__(self, urls: list[str], transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES):
        self.urls, self.transform, self.max_pixels = urls, transform, max_pixels
        self.max_image_bytes, self.max_text_bytes = max_image_bytes, max_text_bytes

    def member_limit(self) -> Callable[[str], int | None]:
        """What the reader reads of a member (`member_limits`); a subclass reading other members widens it."""
        return member_limits(self.max_image_bytes, self.max_text_bytes)

    def parse(self, files: dict[str, Any]) -> dict:
        """One grouped sample -> {"pixel_values", "label"?, "captions"?}; raises only BadSample."""
        return _parse_sample(files, self.transform, self.max_pixels)

    def __iter__(self) -> Iterator[dict]:
        slot, slots = _slot()
        limit = self.member_limit()
        by_shard = len(self.urls) >= slots
        counter = 0
        for shard, url in enumerate(self.urls):
            if by_shard and shard % slots != slot:
                continue
            for position, files in enumerate(_tar_samples(url, limit)):
                if _BAD in files:  # a damaged shard: counted once, by its owner or by slot 0
                    if by_shard or slot == 0:
                        yield files
                    continue
                counter += 1
                if not by_shard and (counter - 1) % slots != slot:
                    continue
                index = (shard << _SHARD_BITS) | position
                try:
                    sample = self.parse(files)
                except BadSample as error:
                    yield {_BAD: error.reason}
                    continue
                sample["index"] = index
                yield sample


def _tar_samples(url: str, limit: Callable[[str], int | None]) -> Iterator[dict[str, bytes]]:
    """The samples of one shard, {extension: bytes}, in tar order (the training pipeline's tar
    reader); a damaged shard ends with one `{_BAD: reason}` marker instead of an exception."""
    from mmcl.data.shards import open_shard
    from mmcl.data.stream import BrokenTar, iter_tar_samples

    try:
        with open_shard(url) as stream:
            for raw in iter_tar_samples(stream, url, keep=lambda index: True, member_limit=limit):
                yield {ext.lower(): data for ext, data in raw.items() if not ext.startswith("__")}
    except (BrokenTar, OSError) as error:
        yield {_BAD: getattr(error, "reason", "unreadable_shard")}


class MapDataset(Dataset):
    """Random-access records (datasets / image folder), this rank's share: i % world == rank."""

    def __init__(self, length: int, read: Callable[[int], dict], transform: ImageTransform):
        self.indices = list(range(get_rank(), length, get_world_size()))
        self.read, self.transform = read, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        try:
            record = self.read(index)
            record["pixel_values"] = self.transform(to_rgb(record.pop("image")))
        except BadSample as error:
            return {_BAD: error.reason}
        except Exception as error:  # a broken file in a folder or dataset: skip and count
            return {_BAD: f"corrupt_image ({type(error).__name__})"}
        record["index"] = index
        return record


def collate(samples: list[dict]) -> dict:
    """Stack good samples; count the bad ones under "skipped" (a Counter of reasons)."""
    good = [s for s in samples if _BAD not in s]
    batch: dict[str, Any] = {"skipped": Counter(s[_BAD] for s in samples if _BAD in s)}
    if not good:
        return batch
    batch["pixel_values"] = torch.stack([s["pixel_values"] for s in good])
    batch["index"] = torch.tensor([s["index"] for s in good], dtype=torch.long)
    if all("label" in s for s in good):
        batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
    if all("captions" in s for s in good):
        batch["captions"] = [s["captions"] for s in good]
    return batch


class EvalLoader:
    """Iterable of non-empty batches; `skipped` counts the samples that could not be decoded."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, classnames: list[str] | None = None,
                 templates: Any = None):
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
        self.skipped: Counter = Counter()
        self.classnames, self.templates = classnames, templates  # found beside the data, if any

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self.skipped.update(batch.pop("skipped"))
            if "pixel_values" in batch:
                yield batch

    def __len__(self) -> int:
        return len(self.loader)


def _beside(folder: Path) -> tuple[list[str] | None, Any]:
    """classnames.txt / templates.json written next to the data (the demo dataset does)."""
    from mmcl.evaluation.prompts import read_list_file

    names = folder / "classnames.txt"
    templates = folder / "templates.json"
    return (read_list_file(names, "classnames") if names.is_file() else None,
            read_list_file(templates, "templates") if templates.is_file() else None)


def build_eval_loader(
    source: str,
    transform: ImageTransform,
    batch_size: int = 64,
    num_workers: int = 0,
    split: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
) -> EvalLoader:
    """An EvalLoader for `source`: shards (pattern, glob or dir of .tar), a `datasets`
    directory saved with `save_to_disk`, or an ImageNet-style folder (root/<class>/<image>).
    Shard members above `max_image_bytes` / `max_text_bytes` are skipped unread (the sample is
    counted as bad), as the training loader does."""
    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        dataset, classnames = _hf_dataset(path, split, transform)
        return EvalLoader(dataset, batch_size, num_workers, classnames)
    if path.is_dir() and not glob.glob(str(path / "*.tar")):
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"{source} holds no .tar shards, no saved `datasets` dataset and no class sub-folders.")
        files = [(f, label) for label, c in enumerate(classes) for f in sorted((path / c).iterdir())
                 if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
        from PIL import Image

        def read(i: int) -> dict:
            with Image.open(files[i][0]) as image:
                image.load()
                return {"image": image, "label": files[i][1]}

        return EvalLoader(MapDataset(len(files), read, transform), batch_size, num_workers, classes)
    urls = expand_shards(source)
    first = Path(urls[0]).parent if "://" not in urls[0] else None
    classnames, templates = _beside(first) if first is not None else (None, None)
    return EvalLoader(ShardDataset(urls, transform, max_pixels, max_image_bytes, max_text_bytes), batch_size, num_workers, classnames, templates)


def _hf_dataset(path: Path, split: str | None, transform: ImageTransform) -> tuple[Dataset, list[str] | None]:
    """A `datasets` dataset from disk: image column + label and/or caption column."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        chosen = split or next((s for s in ("test", "validation", "val") if s in data), names[0] if len(names) == 1 else None)
        if chosen not in data:
            raise ValueError(f"{path} has splits {', '.join(names)}; pick one with --split.")
        data = data[chosen]
    columns = data.column_names
    image_column = next((c for c in columns if isinstance(data.features[c], datasets.Image)), None)
    image_column = image_column or next((c for c in ("image", "img", "jpg", "png") if c in columns), None)
    if image_column is None:
        raise ValueError(f"{path} has no image column (columns: {', '.join(columns)}).")
    label_column = next((c for c in ("label", "labels", "fine_label", "cls") if c in columns), None)
    caption_column = next((c for c in ("captions", "caption", "sentences", "text", "txt") if c in columns), None)
    classnames = None
    if label_column and isinstance(data.features[label_column], datasets.ClassLabel):
        classnames = [n.replace("_", " ") for n in data.features[label_column].names]

    def read(i: int) -> dict:
        row = data[i]
        record = {"image": row[image_column]}
        if label_column:
            record["label"] = int(row[label_column])
        if caption_column:
            value = row[caption_column]
            record["captions"] = [value] if isinstance(value, str) else [str(v) for v in value]
        return record

    return MapDataset(len(data), read, transform), classnames
