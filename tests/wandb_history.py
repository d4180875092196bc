"""Reading offline W&B runs back, for the tests: the records of `run-<id>.wandb` files.

wandb 0.31 has no Python reader of its transaction log any more (wandb-core writes it), so this
reads the format W&B writes: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then LevelDB-log
blocks of 32 KiB whose chunks (CRC-32 seeded with the chunk type, little-endian length, type
full/first/middle/last) carry `wandb.proto.wandb_internal_pb2.Record` protobufs, which W&B's own
classes parse. A checksum mismatch fails loudly.
"""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
W_AND_B_KEYS = ("_step", "_runtime", "_timestamp")  # what W&B adds to each history row


def raw_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (path, data[:HEADER])
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if (checksum, length, kind) == (0, 0, 0):  # zero padding at a block's end
            position += left
            continue
        chunk = data[position + HEADER:position + HEADER + length]
        if len(chunk) < length:  # the writer was stopped mid-chunk
            return
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, (path, position)
        position += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


class OfflineRun:
    """One offline W&B run: the `offline-run-*/run-<id>.wandb` files of one id under `wandb_root` (one per launch)."""

    def __init__(self, wandb_root: Path, run_id: str | None = None):
        files = sorted(Path(wandb_root).glob("offline-run-*/run-*.wandb"))  # a launch in the same second gets a -1 folder
        ids = {path.stem.removeprefix("run-") for path in files}
        assert run_id in ids if run_id else len(ids) == 1, f"run ids under {wandb_root}: {sorted(ids)}"
        self.run_id = run_id or ids.pop()
        self.files = [path for path in files if path.stem == f"run-{self.run_id}"]
        self.wait_until_written()

    def wait_until_written(self, quiet_s: float = 3.0, timeout: float = 60.0) -> None:
        """wandb-core writes the file in its own process, a little after `finish()` returns (or after a
        killed launch's process is gone): wait until each file ends with the run's exit record, or
        (a killed launch's) has not grown for `quiet_s`."""
        deadline = time.time() + timeout
        sizes: dict[Path, tuple[int, float]] = {}
        while time.time() < deadline:
            settled = True
            for path in self.files:
                size = path.stat().st_size
                if sizes.get(path, (None,))[0] != size:
                    sizes[path] = (size, time.time())
                exited = any(r.WhichOneof("record_type") == "exit" for r in records(path))
                settled &= exited or time.time() - sizes[path][1] >= quiet_s
            if settled:
                return
            time.sleep(0.2)
        raise AssertionError(f"W&B files still being written after {timeout:.0f} s: {self.files}")

    def segments(self) -> list[list[Any]]:
        """Each launch's records, in the order the launches started (their run records' start times)."""
        segments = [list(records(path)) for path in self.files]

        def started(segment: list[Any]) -> float:
            return next(r.run.start_time.ToNanoseconds() for r in segment if r.WhichOneof("record_type") == "run")
        return sorted(segments, key=started)

    def run_records(self) -> list[Any]:
        return [r.run for segment in self.segments() for r in segment if r.WhichOneof("record_type") == "run"]

    def config(self) -> dict[str, Any]:
        """The config of the last segment's run record (W&B's own `_wandb` entry left out)."""
        updates = self.run_records()[-1].config.update
        return {_key(u): json.loads(u.value_json) for u in updates if _key(u) != "_wandb"}

    def history(self) -> list[dict[str, Any]]:
        """The history rows of all segments in order, W&B's own keys left out; each with `step`."""
        rows = []
        for segment in self.segments():
            for record in segment:
                if record.WhichOneof("record_type") == "history":
                    row: dict[str, Any] = {}
                    for item in record.history.item:  # media (the plot) come as nested keys
                        path = [item.key] if item.key else list(item.nested_key)
                        node = row
                        for part in path[:-1]:
                            node = node.setdefault(part, {})
                        node[path[-1]] = json.loads(item.value_json)
                    row = {key: value for key, value in row.items() if key not in W_AND_B_KEYS}
                    rows.append({"step": record.history.step.num, **row})
        return rows


def merged_by_step(metrics_records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as W&B rows: the records of one step merged, later values winning."""
    rows: dict[int, dict[str, Any]] = {}
    for record in metrics_records:
        rows.setdefault(record["step"], {"step": record["step"]}).update(record)
    return rows


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |a[k] - b[k]| over the numeric keys (inf when the key sets differ)."""
    if a.keys() != b.keys():
        return float("inf")
    numbers = [abs(a[k] - b[k]) for k in a if isinstance(a[k], (int, float)) and not isinstance(a[k], bool)]
    if any(a[k] != b[k] for k in a if not isinstance(a[k], (int, float))):
        return float("inf")
    return max(numbers, default=0.0)
