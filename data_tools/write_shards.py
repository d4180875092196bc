"""Write WebDataset shards in img2dataset's layout from a folder + table, a `datasets` dataset, or class folders.

    mmcl-write-shards table    --images DIR --table captions.csv --out OUT [--caption-column caption ...]
    mmcl-write-shards hf       --dataset PATH_OR_NAME --out OUT [--split train --caption-column text ...]
    mmcl-write-shards imagenet --root DIR --out OUT

Each sample is `{key}.jpg|png|webp` + `{key}.txt` + `{key}.json` (+ `{key}.cls` with a label);
each shard gets `NNNNN_stats.json`, the set a `sizes.json` and a `stats.json`. Inputs that
cannot be used are listed with their reason in the stats, never fatal. The output depends
only on the input and the options: same input, same bytes, whatever `--workers`.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from .errors import DataToolsError
from .samples import OUTPUT_FORMATS, RESIZE_MODES, Failure, ImageOptions, SourceItem, prepare_sample
from .sources import Source, imagenet_source, table_source
from .tar_writer import DEFAULT_PATTERN, ShardSetStats, ShardSetWriter, stats_name, validate_pattern

T = TypeVar("T")
R = TypeVar("R")

# Files a previous run may have left in the output folder besides the shards themselves.
_WRITING = ".mmcl-shards-writing"  # present while a write runs: marks a stopped write's shards as this tool's
_SET_FILES = ("sizes.json", "stats.json", "classnames.txt", _WRITING)


def write_shards(
    source: Source | Iterable[SourceItem],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 10_000,
    max_shard_bytes: int | None = None,
    image_options: ImageOptions | None = None,
    workers: int = 1,
    pattern: str = DEFAULT_PATTERN,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardSetStats:
    """Write every item of `source` into shards under `out_dir`; returns the set's stats.

    `source` is a `Source` (from `table_source`, `hf_source`, `imagenet_source`) or any
    iterable of `SourceItem`s. `workers` > 1 decodes/resizes/encodes in that many spawned
    processes (a calling script needs the usual `if __name__ == "__main__":` guard); results
    are written in input order, so the shards do not depend on it. An `out_dir`
    that already holds shards is refused unless `overwrite`, which first removes the shards
    and set files listed by its `sizes.json`. Class names, when the source has them, go to
    `classnames.txt`, one per line.
    """
    if not isinstance(source, Source):
        source = Source(items=source)
    image_options = image_options or ImageOptions()
    if workers < 1:
        raise DataToolsError(f"workers must be at least 1, got {workers}.")
    validate_pattern(pattern)
    out_dir = Path(out_dir)
    _clear_previous(out_dir, pattern, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _WRITING).write_text("mmcl-write-shards is writing this folder\n", encoding="utf-8")  # until stats.json

    prepare = functools.partial(prepare_sample, options=image_options)
    bar = tqdm(total=source.total, unit="img", desc=f"writing {out_dir}", disable=not progress, file=sys.stderr)
    # The writer's context removes a half-written shard if anything goes wrong (or ^C).
    with bar, ShardSetWriter(out_dir, pattern, samples_per_shard, max_shard_bytes) as writer:
        for result in ordered_map(prepare, source.items, workers):
            if isinstance(result, Failure):
                writer.fail(result)
            else:
                writer.add(result)
            bar.update(1)
    stats = writer.stats
    if source.classnames is not None:
        (out_dir / "classnames.txt").write_text("".join(f"{name}\n" for name in source.classnames), encoding="utf-8")
    (out_dir / _WRITING).unlink()
    return stats


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window_per_worker: int = 32) -> Iterator[R]:
    """`map(fn, items)` over `workers` processes, in input order, with a bounded number in flight.

    `Pool.imap` would read the whole input ahead (all image bytes in memory); this keeps at
    most `workers * window_per_worker` items queued.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    # spawn: worker start does not inherit the parent's threads or locks (tqdm, arrow, torch).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= workers * window_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _clear_previous(out_dir: Path, pattern: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier shard set; with `overwrite`, remove what this tool wrote there.

    Only a set this tool wrote is removed (its stats.json, or the marker of a write that was
    stopped), and of it only `.tar` shards, their `_stats.json` and the set's own files: shards
    of another tool (img2dataset) and any other file stay.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataToolsError(f"output path {out_dir} is a file; pass a folder for the shards.")
    sizes_file = out_dir / "sizes.json"
    first_shard = out_dir / pattern.format(shard=0)
    if not (sizes_file.exists() or first_shard.exists()):
        return
    written = _written_here(out_dir)
    if written is None:
        raise DataToolsError(
            f"output folder {out_dir} already holds shards that mmcl-write-shards did not write (no stats.json of its "
            "own); choose another --out."
        )
    if not overwrite:
        raise DataToolsError(
            f"output folder {out_dir} already holds shards; pass --overwrite to replace them or choose another --out."
        )
    names = list(written)
    shard = 0
    while (out_dir / pattern.format(shard=shard)).exists():  # shards of a stopped write, which no stats.json lists
        names.append(pattern.format(shard=shard))
        shard += 1
    for name in dict.fromkeys(names):
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".tar"):
            continue  # only shards, and only in this folder
        for path in (out_dir / name, out_dir / stats_name(name)):
            path.unlink(missing_ok=True)
    for name in _SET_FILES:
        (out_dir / name).unlink(missing_ok=True)


def _written_here(out_dir: Path) -> list | None:
    """The shard names of the set this tool wrote in `out_dir` ([] for a stopped write), or None when it did not."""
    try:
        stats = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stats = None
    if isinstance(stats, dict) and isinstance(stats.get("sizes"), dict) and {"shards", "failure_reasons"} <= set(stats):
        return list(stats["sizes"])
    return [] if (out_dir / _WRITING).is_file() else None


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """`500000`, `64K`, `256MB`, `1.5G`, `1GiB` -> bytes (K/M/G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or a number with K, M or G, like 1G")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl-write-shards",
        description="Write WebDataset shards (img2dataset layout) from images and captions.",
    )
    sub = parser.add_subparsers(dest="source_type", required=True, metavar="{table,hf,imagenet}")

    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", required=True, help="output folder for the shards")
    out.add_argument(
        "--samples-per-shard", metavar="N", type=int, default=10_000, help="samples per shard (default 10000)"
    )
    out.add_argument(
        "--max-shard-bytes",
        metavar="SIZE",
        type=parse_size,
        default=None,
        help="start a new shard before a file exceeds this size, e.g. 1G",
    )
    out.add_argument(
        "--pattern",
        metavar="PATTERN",
        default=DEFAULT_PATTERN,
        help=f"shard file name pattern (default {DEFAULT_PATTERN!r})",
    )
    out.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default="none",
        help="none (default), shorter: shorter side to --image-size, center_crop: then crop a square",
    )
    out.add_argument(
        "--image-size", metavar="N", type=int, default=None, help="target size in pixels for --resize-mode"
    )
    out.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="keep",
        help="image format in the shards; keep (default) re-encodes only resized images",
    )
    out.add_argument(
        "--jpeg-quality", metavar="Q", type=int, default=95, help="JPEG/WebP quality when encoding (default 95)"
    )
    out.add_argument(
        "--workers", metavar="N", type=int, default=1, help="processes for decoding/resizing/encoding (default 1)"
    )
    out.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    table = sub.add_parser("table", parents=[common], help="image folder + CSV/TSV/JSONL/parquet captions table")
    table.add_argument("--images", metavar="DIR", required=True, help="folder the table's image paths are relative to")
    table.add_argument("--table", metavar="FILE", required=True, help="captions table: .csv, .tsv, .jsonl or .parquet")
    table.add_argument(
        "--image-column", metavar="NAME", default="image", help="column with image paths (default image)"
    )
    table.add_argument(
        "--caption-column",
        metavar="NAME",
        default="caption",
        help="column with captions, a string or a JSON list (default caption)",
    )
    table.add_argument(
        "--label-column", metavar="NAME", default=None, help="column with integer labels, written as .cls"
    )
    table.add_argument("--no-captions", action="store_true", help="write image-only samples (no .txt)")

    hf = sub.add_parser(
        "hf", parents=[common], help="a Hugging Face datasets dataset (saved, local folder or Hub name)"
    )
    hf.add_argument(
        "--dataset", metavar="PATH_OR_NAME", required=True, help="save_to_disk folder, data folder, or Hub dataset name"
    )
    hf.add_argument("--split", metavar="NAME", default="train", help="split to write (default train)")
    hf.add_argument("--config", metavar="NAME", default=None, help="dataset configuration name (Hub datasets)")
    hf.add_argument(
        "--builder", metavar="NAME", default="imagefolder", help="builder for a plain data folder (default imagefolder)"
    )
    hf.add_argument("--image-column", metavar="NAME", default="image", help="image column (default image)")
    hf.add_argument(
        "--caption-column",
        metavar="NAME",
        default="text",
        help="caption column: strings, lists or a ClassLabel (default text)",
    )
    hf.add_argument("--label-column", metavar="NAME", default=None, help="integer/ClassLabel column written as .cls")
    hf.add_argument("--no-captions", action="store_true", help="write image-only samples (no .txt)")
    hf.add_argument("--cache-dir", metavar="DIR", default=None, help="datasets cache folder")

    imagenet = sub.add_parser(
        "imagenet", parents=[common], help="folder of class subfolders -> labelled shards + classnames.txt"
    )
    imagenet.add_argument("--root", metavar="DIR", required=True, help="folder with one subfolder of images per class")
    imagenet.add_argument("--no-captions", action="store_true", help="do not write the class name as the caption")
    return parser


def source_from_args(args: argparse.Namespace) -> Source:
    """Build the source a parsed command line names."""
    if args.source_type == "table":
        caption_column = None if args.no_captions else args.caption_column
        return table_source(args.images, args.table, args.image_column, caption_column, args.label_column)
    if args.source_type == "hf":
        from .hf_source import hf_source

        caption_column = None if args.no_captions else args.caption_column
        return hf_source(
            args.dataset,
            args.split,
            args.image_column,
            caption_column,
            args.label_column,
            args.config,
            args.builder,
            args.cache_dir,
        )
    return imagenet_source(args.root, captions=not args.no_captions)


def summary(stats: ShardSetStats) -> str:
    """One line: samples written, shards, skipped inputs by reason."""
    line = f"wrote {stats.successes} samples in {len(stats.shards)} shards to {stats.out_dir}"
    if stats.failures:
        reasons = ", ".join(f"{reason} {count}" for reason, count in stats.failure_reasons.items())
        line += f"; skipped {len(stats.failures)} inputs ({reasons}; see stats.json)"
    return line


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`mmcl-write-shards`)."""
    args = build_parser().parse_args(argv)
    try:
        options = ImageOptions(
            resize_mode=args.resize_mode,
            image_size=args.image_size,
            output_format=args.output_format,
            quality=args.jpeg_quality,
            require_caption=not args.no_captions,
        )
        source = source_from_args(args)
        stats = write_shards(
            source,
            args.out,
            samples_per_shard=args.samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            image_options=options,
            workers=args.workers,
            pattern=args.pattern,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except DataToolsError as error:
        raise SystemExit(f"mmcl-write-shards: error: {error}") from None
    print(summary(stats))
    if stats.successes == 0:
        raise SystemExit(
            f"mmcl-write-shards: error: no input could be written; the reasons are listed in {Path(args.out) / 'stats.json'}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
