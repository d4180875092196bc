"""Hugging Face `datasets` as a shard-writer source.

`dataset` may be a folder written by `save_to_disk` (a Dataset or a DatasetDict), a local
data folder read with a builder (`imagefolder` by default: class subfolders and/or a
`metadata.csv|jsonl` with captions), or a Hub dataset name (needs network access).
Images are read undecoded (`Image(decode=False)`), so their original bytes reach the shard
untouched unless resizing is asked for.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import DataToolsError
from .samples import SourceItem, parse_label
from .sources import Source, caption_list, require_columns


def load_hf_dataset(
    dataset: str | os.PathLike,
    split: str = "train",
    config: str | None = None,
    builder: str = "imagefolder",
    cache_dir: str | os.PathLike | None = None,
):
    """Load one split: `load_from_disk` for saved datasets, `builder` for other local folders, else the Hub."""
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataToolsError(
                    f"saved dataset {path} has no split {split!r} (splits: {', '.join(loaded)}); set --split."
                )
            return loaded[split]
        return loaded
    text = str(dataset)
    if not path.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text):
        # Hub ids are `name` or `owner/name`; anything else was meant as a local folder.
        raise DataToolsError(
            f"dataset folder {dataset} does not exist; pass a save_to_disk folder, a data folder or a Hub dataset name."
        )
    try:
        if path.is_dir():
            return datasets.load_dataset(builder, config, data_dir=str(path), split=split, cache_dir=cache_dir)
        return datasets.load_dataset(str(dataset), config, split=split, cache_dir=cache_dir)
    except ValueError as error:
        if "split" in str(error).lower():
            raise DataToolsError(f"dataset {dataset} has no split {split!r} ({error}); set --split.") from None
        raise DataToolsError(f"could not load dataset {dataset} ({error}).") from None
    except (FileNotFoundError, ConnectionError, OSError) as error:
        raise DataToolsError(
            f"could not load dataset {dataset!r}: it is not a local folder and loading it from the Hub failed ({error})."
        ) from None


def hf_source(
    dataset: str | os.PathLike,
    split: str = "train",
    image_column: str = "image",
    caption_column: str | None = "text",
    label_column: str | None = None,
    config: str | None = None,
    builder: str = "imagefolder",
    cache_dir: str | os.PathLike | None = None,
) -> Source:
    """Rows of one split of a `datasets` dataset as shard-writer items, in dataset order.

    A caption column may hold strings, lists of strings or a `ClassLabel` (its names become
    the captions). A `ClassLabel` label column also provides the class names written to
    `classnames.txt`. `caption_column=None` writes no captions.
    """
    import datasets

    ds = load_hf_dataset(dataset, split, config, builder, cache_dir)
    require_columns(
        list(ds.column_names),
        {"--image-column": image_column, "--caption-column": caption_column, "--label-column": label_column},
        f"dataset {dataset} (split {split!r})",
    )
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    caption_names = _class_names(ds.features[caption_column]) if caption_column else None
    classnames = _class_names(ds.features[label_column]) if label_column else None
    ds = ds.select_columns(list(dict.fromkeys(c for c in (image_column, caption_column, label_column) if c)))
    data_dir = Path(dataset).resolve() if Path(dataset).is_dir() else None

    def items() -> Iterator[SourceItem]:
        for index, row in enumerate(ds):
            yield _row_item(row, index, split, data_dir, image_column, caption_column, label_column, caption_names)

    return Source(items=items(), total=len(ds), classnames=classnames)


def _class_names(feature: Any) -> list[str] | None:
    import datasets

    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _row_item(
    row: dict,
    index: int,
    split: str,
    data_dir: Path | None,
    image_column: str,
    caption_column: str | None,
    label_column: str | None,
    caption_names: list[str] | None,
) -> SourceItem:
    value = row[image_column]
    image, image_path = None, None
    if isinstance(value, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
        image, image_path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        image = bytes(value)
    elif isinstance(value, str):
        image_path = value
    elif value is not None and hasattr(value, "save"):  # a decoded PIL image from a custom feature
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        image = buffer.getvalue()
    source = f"{split}[{index}]"
    if image_path and not image and data_dir is not None:
        # Files of a local folder are named by their path inside it: readable, machine-independent.
        path = Path(image_path)
        if path.is_relative_to(data_dir):
            source = path.relative_to(data_dir).as_posix()
    if image is None and not image_path:
        return SourceItem(source=source, error="missing_image", detail=f"empty {image_column!r}")

    captions: list[str] = []
    if caption_column is not None:
        cell = row[caption_column]
        if caption_names is not None and isinstance(cell, int):
            captions = [caption_names[cell]] if 0 <= cell < len(caption_names) else []
        else:
            captions = caption_list(cell)
    label = None
    if label_column is not None:
        try:
            label = parse_label(row[label_column])
        except ValueError as error:
            return SourceItem(source=source, error="bad_label", detail=f"{label_column!r}: {error}")
    return SourceItem(
        source=source, image=image, image_path=None if image else image_path, captions=tuple(captions), label=label
    )
