"""`mmcl curate write`: a selection materialised as new WebDataset shards, for those who prefer that to `data.selection`.

    mmcl curate write --selection FILE --shards PATTERN --out DIR [--epoch E] [--seed S]
                      [--samples-per-shard N] [--overwrite]

The source shards are read in order with mmcl's tar reader (`mmcl.data.stream.iter_tar_samples`);
a sample is written when its key is in the selection and drawn for (seed, epoch): probability 1
always, probability p when `derive_seed(seed, "selection", epoch, key) / 2**64 < p` — the draw
the loader makes for `data.selection` (`drawn`), so `--epoch E --seed S` writes exactly what epoch
E of a run with seed S trains on. Each written sample's members keep their bytes (nothing is
decoded or re-encoded), named `KEY.EXT` in their original order. Output: DIR/00000.tar, ...
(`--samples-per-shard` samples each), DIR/sizes.json ({"00000.tar": count, ...}, as mmcl's shard
tools write it, so epoch mode knows the sizes) and DIR/mmcl_curate.json (the command, its
arguments and counts; it marks DIR as this command's output for --overwrite). Shard problems are
counted as training counts them (unreadable_shard, truncated_shard), never fatal; a selected key
met a second time is written once (counted as duplicate_key); selected keys the shards do not
hold are counted as not_found.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from mmcl.data.selection import drawn  # the loader's rule for data.selection

from .select_io import SelectionError

MARKER = "mmcl_curate.json"
SHARD_NAME = "{shard:05d}.tar"
_MTIME = 0  # fixed member headers (time, owner, mode), as data_tools' writer: same input, same bytes


def read_selection(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(keys, probabilities float64) of a selection file; SelectionError when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise SelectionError(f"selection file {path} does not exist; write it with `mmcl curate select --out {path}`.")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise SelectionError(f"selection file {path} is not a readable Parquet file ({error}).") from None
    missing = [c for c in ("key", "probability") if c not in table.column_names]
    if missing:
        raise SelectionError(f"selection file {path} has no column {', '.join(missing)}; a selection holds key and probability.")
    return table.column("key").to_pylist(), table.column("probability").to_numpy().astype(np.float64)


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> dict | None:
    """Refuse an --out that is a file or a non-empty folder this command did not write; without
    --overwrite also an earlier output. Returns the earlier output's marker (to remove its files), else None."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SelectionError(f"--out {out} is a file; pass a folder for the shards.")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("command") != "write":
        raise SelectionError(f"--out {out} is a non-empty folder that `mmcl curate write` did not write; choose another --out.")
    if not overwrite:
        raise SelectionError(f"--out {out} holds shards of an earlier `mmcl curate write`; pass --overwrite to replace them.")
    return marker


def _remove_earlier(out: Path, marker: dict) -> None:
    """Remove only what an earlier write made: its shards (by name, in this folder), sizes.json and the marker."""
    names = [n for n in marker.get("shard_names", []) if isinstance(n, str) and Path(n).name == n and n.endswith(".tar")]
    for name in names:
        (out / name).unlink(missing_ok=True)
        (out / f"{name}.tmp").unlink(missing_ok=True)
    (out / "sizes.json").unlink(missing_ok=True)
    (out / MARKER).unlink(missing_ok=True)


class _ShardWriter:
    """Consecutive tar shards of at most `per_shard` samples, each written as NAME.tmp then renamed."""

    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None or self.sizes[self._name] >= self.per_shard:
            self._close()
            self._name = SHARD_NAME.format(shard=len(self.sizes))
            self.sizes[self._name] = 0
            self._tar = tarfile.open(self.out / f"{self._name}.tmp", "w", format=tarfile.PAX_FORMAT)
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), _MTIME, 0o444, 0, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.sizes[self._name] += 1

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.out / f"{self._name}.tmp", self.out / self._name)
            self._tar = None

    def close(self) -> dict[str, int]:
        self._close()
        return self.sizes


def write_selection_shards(selection: str | os.PathLike, shards: str, out: str | os.PathLike, *, epoch: int = 0,
                           seed: int = 0, samples_per_shard: int = 10_000, overwrite: bool = False) -> dict[str, Any]:
    """Write the selected (and, for p < 1, drawn) samples of `shards` to new shards in `out`; returns the summary
    (also written to OUT/mmcl_curate.json): counts, skips {reason: n}, sizes {shard name: n}."""
    from mmcl.data.shards import NoShardsError, expand_shards, open_shard
    from mmcl.data.stream import BrokenTar, iter_tar_samples
    from mmcl.redact import redact

    if samples_per_shard < 1:
        raise SelectionError(f"--samples-per-shard must be at least 1, got {samples_per_shard}.")
    if epoch < 0:
        raise SelectionError(f"--epoch must be >= 0, got {epoch}.")
    earlier = check_out_dir(out, overwrite)
    keys, probabilities = read_selection(selection)
    try:
        urls = [url for source in expand_shards(shards) for url in source]
    except NoShardsError as error:
        raise SelectionError(str(error)) from None
    wanted = {key for key, p in zip(keys, probabilities) if drawn(seed, epoch, key, float(p))}
    out = Path(out)
    if earlier is not None:
        _remove_earlier(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"command": "write", "version": 1, "selection": redact(str(selection)),
                               "shards": redact(shards), "epoch": epoch, "seed": seed,
                               "samples_per_shard": samples_per_shard, "complete": False}
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")  # ours from the start
    writer = _ShardWriter(out, samples_per_shard)
    skips: dict[str, int] = {}
    written: set[str] = set()
    for url in urls:
        try:
            stream = open_shard(url)
        except Exception:  # any failure to open is a shard training would count as unreadable
            skips["unreadable_shard"] = skips.get("unreadable_shard", 0) + 1
            continue
        try:
            for sample in iter_tar_samples(stream, url, keep=lambda index: True):
                key = sample["__key__"]
                if key not in wanted:
                    continue
                if key in written:
                    skips["duplicate_key"] = skips.get("duplicate_key", 0) + 1
                    continue
                writer.add(key, [(k, v) for k, v in sample.items() if not k.startswith("__")])
                written.add(key)
        except BrokenTar as error:
            skips[error.reason] = skips.get(error.reason, 0) + 1
        finally:
            try:
                stream.close()
            except Exception:  # a pipe's exit status; the shard is already counted
                pass
    sizes = writer.close()
    if len(wanted) > len(written):
        skips["not_found"] = len(wanted) - len(written)
    (out / "sizes.json").write_bytes(json.dumps(sizes, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    summary.update({"complete": True, "selected": len(keys), "drawn": len(wanted), "written": len(written),
                    "skips": dict(sorted(skips.items())), "shard_names": list(sizes), "sizes": sizes})
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--selection", required=True, metavar="FILE", help="selection file written by `mmcl curate select`")
    parser.add_argument("--shards", required=True, metavar="PATTERN", help="the shards the selection was made from (as scored)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the new shards (00000.tar ..., sizes.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier `mmcl curate write` output in --out (never another folder)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose draw of the balanced samples to write (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed the draw uses (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N", help="samples per output shard (default 10000)")


def main(args: argparse.Namespace) -> int:
    """Run `mmcl curate write`; user errors raise SelectionError (printed by the CLI as one line)."""
    summary = write_selection_shards(args.selection, args.shards, args.out, epoch=args.epoch, seed=args.seed,
                                     samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    skips = ", ".join(f"{k} {v}" for k, v in summary["skips"].items()) or "none"
    print(f"mmcl: wrote {summary['written']} samples ({summary['drawn']} drawn for epoch {args.epoch} of "
          f"{summary['selected']} selected) into {len(summary['sizes'])} shards in {args.out}; skipped: {skips}", flush=True)
    if summary["written"] == 0:
        raise SelectionError(f"no selected sample was found in --shards {summary['shards']}; pass the shards the "
                             "selection was scored from.")
    return 0
