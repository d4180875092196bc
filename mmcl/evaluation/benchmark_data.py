"""Reading a benchmark dataset folder: CLIP_benchmark's WebDataset layout, or mmcl's own shards.

CLIP_benchmark's layout (`clip_benchmark.webdataset_builder`, as the clip-benchmark/wds_* sets are published):

    wds_<name>/test/0.tar .. (n-1).tar + test/nshards.txt, train/... (linear probes)
    wds_<name>/classnames.txt                          one class name per line
    wds_<name>/zeroshot_classification_templates.txt   one template per line, {c} = the class name
    wds_<name>/dataset_type.txt                        "retrieval" | "multilabel" (absent: classification)

Samples: `<key>.webp|png|jpg|jpeg` + `<key>.cls` (integer label), `<key>.npy` (multi-label: a 0/1 vector
over the classes) or `<key>.txt` (retrieval: the captions, one per line). mmcl's own shards (a folder of
.tar, or its test/ sub-folder) use `.cls` / `.txt` as `mmcl.evaluation.data` reads them (a caption or a
JSON list), with classnames.txt / templates.json beside them.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmcl.data.decode import IMAGE_EXTENSIONS, BadSample, caption_list, decode_image, decode_label, member_bytes
from mmcl.evaluation.data import EvalLoader, ShardDataset, member_limits

MAX_LABEL_BYTES = 1 << 20  # a .npy multi-label vector (a few hundred bytes for VOC's 20 classes)


@dataclass
class DatasetFolder:
    """What a benchmark dataset folder holds."""

    path: Path
    kind: str  # "classification" | "multilabel" | "retrieval" (dataset_type.txt; classification when absent)
    classnames: list[str] | None
    templates: list[str] | dict[str, list[str]] | None
    clip_benchmark: bool  # CLIP_benchmark's layout (test/ sub-folder) rather than mmcl's flat shard folder

    def shards(self, split: str = "test") -> list[str]:
        """The split's .tar files in shard order (nshards.txt's 0..n-1 when present, else sorted by number)."""
        if (self.path / split).is_dir():
            folder = self.path / split
        elif split == "test" and not self.clip_benchmark:  # mmcl's flat folder of shards
            folder = self.path
        else:
            raise FileNotFoundError(f"{self.path} has no {split}/ folder of shards.")
        nshards = folder / "nshards.txt"
        if nshards.is_file():
            try:
                count = int(nshards.read_text().strip())
            except ValueError:
                raise ValueError(f"{nshards} does not hold a shard count.") from None
            paths = [folder / f"{i}.tar" for i in range(count)]
            missing = [p for p in paths if not p.exists()]
            if missing:
                raise FileNotFoundError(f"{missing[0]} is missing ({nshards} says {count} shards).")
        else:
            paths = sorted(folder.glob("*.tar"), key=_natural)
        if not paths:
            raise FileNotFoundError(f"{folder} holds no .tar shards.")
        return [str(p) for p in paths]


def _natural(path: Path) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def read_folder(path: str | Path) -> DatasetFolder:
    """The DatasetFolder of `path` (class names and templates read, when present)."""
    from mmcl.evaluation.prompts import read_list_file

    path = Path(path)
    kind_file = path / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("classification", "multilabel", "retrieval"):
        raise ValueError(f"{kind_file} says '{kind}'; CLIP_benchmark's types are retrieval and multilabel.")
    names = path / "classnames.txt"
    classnames = [line.strip() for line in names.read_text().splitlines()] if names.is_file() else None
    templates: Any = None
    for candidate in ("zeroshot_classification_templates.txt", "templates.json"):
        if (path / candidate).is_file():
            if candidate.endswith(".txt"):  # CLIP_benchmark strips each line and keeps them all
                templates = [line.strip() for line in (path / candidate).read_text().splitlines()]
            else:
                templates = read_list_file(path / candidate, "templates")
            break
    return DatasetFolder(path, kind, classnames, templates, clip_benchmark=(path / "test").is_dir())


class BenchmarkShards(ShardDataset):
    """ShardDataset over a benchmark folder's shards: also reads `.npy` multi-label vectors, and
    CLIP_benchmark's retrieval captions (one per line of `.txt`)."""

    def __init__(self, urls: list[str], transform: Callable, folder: DatasetFolder, **limits: int):
        super().__init__(urls, transform, **limits)
        self.folder = folder

    def member_limit(self) -> Callable[[str], int | None]:
        base = member_limits(self.max_image_bytes, self.max_text_bytes)
        return lambda extension: MAX_LABEL_BYTES if extension == "npy" else base(extension)

    def parse(self, files: dict[str, Any]) -> dict:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
        if image_ext is None:
            raise BadSample("missing_image")
        out: dict[str, Any] = {}
        if self.folder.kind == "retrieval" or ("txt" in files and "cls" not in files and "npy" not in files):
            if "txt" not in files:
                raise BadSample("missing_caption")
            out["captions"] = self._captions(member_bytes(files["txt"], "txt"))
        elif self.folder.kind == "multilabel":
            if "npy" not in files:
                raise BadSample("missing_label")
            out["label"] = _multilabel(member_bytes(files["npy"], "npy"))
        else:
            if "cls" not in files:
                raise BadSample("missing_label")
            out["label"] = decode_label(member_bytes(files["cls"], "cls"))
        image = decode_image(member_bytes(files[image_ext], image_ext), self.max_pixels)
        try:
            out["pixel_values"] = self.transform(image)
        except Exception as error:
            raise BadSample("transform_error", f"{type(error).__name__}: {error}") from error
        return out

    def _captions(self, data: bytes) -> list[str]:
        if self.folder.kind != "retrieval":  # mmcl's own shards: one caption or a JSON list
            return caption_list(data)
        try:
            captions = bytes(data).decode("utf-8").splitlines()  # CLIP_benchmark: str.splitlines of the member
        except UnicodeDecodeError as error:
            raise BadSample("bad_caption_encoding", str(error)) from error
        if not captions:
            raise BadSample("empty_caption")
        return captions


def _multilabel(data: bytes) -> list[int]:
    """A `.npy` 0/1 vector (numpy's format, read without pickle) as a list of ints."""
    import numpy as np

    try:
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except Exception as error:
        raise BadSample("bad_label", f"{type(error).__name__}: {error}") from error
    if array.ndim != 1:
        raise BadSample("bad_label", f"a multi-label vector must be 1-D, got shape {array.shape}")
    return [int(v) for v in array.tolist()]


def benchmark_loader(folder: DatasetFolder, split: str, transform: Callable, batch_size: int, workers: int,
                     **limits: int) -> EvalLoader:
    """An EvalLoader (sharded over ranks and workers, samples in dataset order) over a split of `folder`."""
    urls = folder.shards(split)
    return EvalLoader(BenchmarkShards(urls, transform, folder, **limits), batch_size, workers,
                      folder.classnames, folder.templates)
