"""Inputs for the shard writer: an image folder with a captions table, or ImageNet-style class folders.

A source is a `Source`: an iterable of `SourceItem`s in a deterministic order, their number
(for the progress bar) and, for classification data, the class names. The Hugging Face
`datasets` source lives in `hf_source.py`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmcl.data.decode import IMAGE_EXTENSIONS

from .errors import DataToolsError
from .samples import SourceItem, parse_label

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass
class Source:
    """Items to write, how many there are (None when unknown) and optional class names."""

    items: Iterable[SourceItem]
    total: int | None = None
    classnames: list[str] | None = None


# ---------------------------------------------------------------------------------------------
# Image folder + captions table


def read_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a CSV, TSV, JSONL or parquet table; returns (column names, rows as dicts)."""
    path = Path(path)
    if not path.is_file():
        raise DataToolsError(
            f"captions table {path} does not exist; pass an existing .csv, .tsv, .jsonl or .parquet file."
        )
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataToolsError(f"captions table {path} has an unknown extension; use one of {', '.join(TABLE_FORMATS)}.")
    if kind in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="," if kind == "csv" else "\t")
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        return columns, rows
    if kind == "jsonl":
        rows, columns = [], {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataToolsError(
                        f"line {number} of {path} is not valid JSON ({error.msg}); fix or remove it."
                    ) from None
                if not isinstance(row, dict):
                    raise DataToolsError(f"line {number} of {path} is not a JSON object; each line must be one row.")
                rows.append(row)
                columns.update(dict.fromkeys(row))
        return list(columns), rows
    import pyarrow.parquet as pq  # comes with `datasets`

    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist()


def require_columns(columns: list[str], wanted: dict[str, str | None], where: str) -> None:
    """Fail with one sentence naming a missing column, the available ones and the option to set."""
    for option, column in wanted.items():
        if column is not None and column not in columns:
            available = ", ".join(columns) or "none"
            raise DataToolsError(f"{where} has no column {column!r} (available: {available}); set {option}.")


def caption_list(value: Any) -> list[str]:
    """Captions from a table cell: a string, a JSON list in a string, or a list; None -> []."""
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from pandas-written tables
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return [str(c) for c in parsed if c is not None]
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(c) for c in value if c is not None]
    return [str(value)]


def table_source(
    images_dir: str | os.PathLike,
    table: str | os.PathLike,
    image_column: str = "image",
    caption_column: str | None = "caption",
    label_column: str | None = None,
) -> Source:
    """Images in a folder, captions (and labels) in a table whose `image_column` holds paths.

    Paths are relative to `images_dir` (absolute paths also work). Several rows naming the
    same image are grouped into one sample with all their captions, in first-seen order; a
    cell may also hold a JSON list of captions. `caption_column=None` writes no captions.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataToolsError(
            f"image folder {images_dir} does not exist; pass the folder the table's paths are relative to."
        )
    columns, rows = read_table(table)
    require_columns(
        columns,
        {"--image-column": image_column, "--caption-column": caption_column, "--label-column": label_column},
        f"captions table {table}",
    )
    groups: dict[str, dict[str, Any]] = {}
    # Inputs in first-seen order: a finished SourceItem for a bad row, else the image name
    # whose group is turned into an item once every row's captions are in.
    order: list[SourceItem | str] = []
    for number, row in enumerate(rows, start=1):
        name = row.get(image_column)
        name = "" if name is None else str(name).strip()
        if not name:
            order.append(
                SourceItem(source=f"row {number}", error="missing_image_path", detail=f"empty {image_column!r}")
            )
            continue
        group = groups.get(name)
        if group is None:
            group = groups[name] = {"captions": [], "label": row.get(label_column) if label_column else None}
            order.append(name)
        if caption_column is not None:
            group["captions"].extend(caption_list(row.get(caption_column)))
    items = [_table_item(images_dir, entry, groups, label_column) for entry in order]
    return Source(items=items, total=len(items))


def _table_item(images_dir: Path, entry: SourceItem | str, groups: dict, label_column: str | None) -> SourceItem:
    if isinstance(entry, SourceItem):
        return entry
    group = groups[entry]
    label = None
    if label_column is not None:
        try:
            label = parse_label(group["label"])
        except ValueError as error:
            return SourceItem(source=entry, error="bad_label", detail=f"{label_column!r}: {error}")
    return SourceItem(source=entry, image_path=str(images_dir / entry), captions=tuple(group["captions"]), label=label)


# ---------------------------------------------------------------------------------------------
# ImageNet-style folder: one subfolder per class


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted class subfolder names of an ImageNet-style folder (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataToolsError(f"image folder {root} does not exist; pass a folder with one subfolder per class.")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataToolsError(
            f"image folder {root} has no class subfolders; put each class's images in a folder named after it."
        )
    return names


def classname_of(folder: str) -> str:
    """Folder name -> class name: underscores become spaces (`golden_retriever` -> `golden retriever`)."""
    return folder.replace("_", " ").strip()


def imagenet_source(root: str | os.PathLike, captions: bool = True) -> Source:
    """Class subfolders of `root` (sorted) -> labels 0..C-1; each image's caption is its class name.

    Images are found recursively inside each class folder by extension and sorted by
    relative path, so the order and the labels do not depend on the file system.
    """
    root = Path(root)
    folders = class_folders(root)
    files: list[tuple[int, Path]] = []
    for label, folder in enumerate(folders):
        found = sorted(
            (p for p in (root / folder).rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        files.extend((label, path) for path in found)
    classnames = [classname_of(f) for f in folders]

    def items() -> Iterator[SourceItem]:
        for label, path in files:
            yield SourceItem(
                source=path.relative_to(root).as_posix(),
                image_path=str(path),
                captions=(classnames[label],) if captions else (),
                label=label,
            )

    return Source(items=items(), total=len(files), classnames=classnames)
