"""Reading a scores folder and writing / recognising a selection file (formats: docs/guides/curation.md).

    scores = read_scores("scores/", ["key", "shard", "index", "score"])   # dict of numpy columns, shard order
    write_selection("sel.parquet", table, info, overwrite=False)           # atomic; refuses a foreign file
    info = selection_info("sel.parquet")                                   # the "mmcl" metadata, or None

A selection file is one Parquet file with the columns key (string), probability (float64),
shard (string) and index (int32), and the Parquet key-value metadata "mmcl": JSON
{"command": "select", "version": 1, "rules": [...], ...} that marks it as written by
`mmcl curate select` (what --overwrite checks before it replaces a file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmcl.curate.errors import CurateError

SELECTION_VERSION = 1
SCORE_COLUMNS = ("key", "shard", "index", "caption", "score", "image_embedding", "text_embedding")


class SelectionError(CurateError):
    """A user error of `mmcl curate select` / `write`: one sentence naming the thing and what to do."""


def score_parts(scores_dir: str | os.PathLike) -> list[Path]:
    """The Parquet parts of a scores folder (DIR/parts/*.parquet), in name (= shard) order."""
    root = Path(scores_dir)
    if not root.is_dir():
        raise SelectionError(f"scores folder {scores_dir} does not exist; pass --scores the --out folder of `mmcl curate score`.")
    parts = sorted((root / "parts").glob("*.parquet"))
    if not parts:
        raise SelectionError(f"scores folder {scores_dir} has no parts/*.parquet; run `mmcl curate score --out {scores_dir}` "
                             "first (or let it finish).")
    return parts


def read_scores(scores_dir: str | os.PathLike, columns: list[str]) -> dict[str, Any]:
    """The given columns of every part, concatenated in shard order.

    Returns {column: values}: key, shard, caption -> list[str | None]; index -> int32 [n];
    score -> float32 [n]; image_embedding / text_embedding -> float16 [n, D].
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for part in score_parts(scores_dir):
        try:
            names = pq.read_schema(part).names
        except (OSError, pa.ArrowException) as error:
            raise SelectionError(f"scores part {part} is not a readable Parquet file ({error}); delete it and rerun "
                                 "`mmcl curate score` to score that shard again.") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise SelectionError(f"scores part {part} has no column {', '.join(missing)}; it was not written by "
                                 "`mmcl curate score` (or by an older version): score the shards again.")
        tables.append(pq.read_table(part, columns=columns))
    try:
        table = pa.concat_tables(tables).combine_chunks()
    except pa.ArrowInvalid as error:
        raise SelectionError(f"the parts of scores folder {scores_dir} differ in their columns ({error}); score all its "
                             "shards with one model and one version of mmcl.") from None
    out: dict[str, Any] = {}
    for name in columns:
        column = table.column(name)
        if name in ("image_embedding", "text_embedding"):
            flat = column.chunk(0).flatten().to_numpy(zero_copy_only=False) if column.num_chunks else np.zeros(0, np.float16)
            width = column.type.list_size if hasattr(column.type, "list_size") else 0
            out[name] = flat.reshape(len(table), width) if width else flat.reshape(len(table), -1)
        elif name == "index":
            out[name] = column.to_numpy().astype(np.int32)
        elif name == "score":
            out[name] = column.to_numpy().astype(np.float32)
        else:
            out[name] = column.to_pylist()
    return out


def selection_info(path: str | os.PathLike) -> dict | None:
    """The "mmcl" metadata of a selection file `mmcl curate select` wrote, else None (any other file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
    try:
        info = json.loads((schema.metadata or {}).get(b"mmcl", b""))
    except ValueError:
        return None
    if isinstance(info, dict) and info.get("command") == "select" and {"key", "probability"} <= set(schema.names):
        return info
    return None


def check_out_file(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse --out before any work: a folder, an existing file without --overwrite, or a file that is no selection."""
    path = Path(out)
    if path.is_dir():
        raise SelectionError(f"--out {out} is a folder; pass the selection file to write, e.g. {Path(out) / 'selection.parquet'}.")
    if not path.exists():
        return
    if not overwrite:
        raise SelectionError(f"--out {out} already exists; pass --overwrite to replace an earlier selection or choose another file.")
    if selection_info(path) is None:
        raise SelectionError(f"--out {out} is not a selection written by `mmcl curate select`; mmcl replaces only its own "
                             "files: choose another --out.")


def write_selection(out: str | os.PathLike, columns: dict[str, Any], info: dict, overwrite: bool = False) -> Path:
    """Write the selection atomically (temporary file in the same folder, fsync, rename).

    columns: key list[str], probability float64 [n], shard list[str], index int32 [n].
    info: the JSON stored as Parquet metadata "mmcl" ("command": "select" and "version" are added).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_out_file(out, overwrite)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("key", pa.string()), ("probability", pa.float64()), ("shard", pa.string()), ("index", pa.int32())],
                       metadata={"mmcl": json.dumps({"command": "select", "version": SELECTION_VERSION, **info})})
    table = pa.table({"key": pa.array(columns["key"], pa.string()),
                      "probability": pa.array(np.asarray(columns["probability"], np.float64)),
                      "shard": pa.array(columns["shard"], pa.string()),
                      "index": pa.array(np.asarray(columns["index"], np.int32))}, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
