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

    def wait_until_written(self, timeout: float = 180.0) -> None:
        """wandb-core writes the files in its own process: a finished launch's a moment after `finish()`
        returns, a stopped or killed one's when the detached service ends it (mmcl.engine.tracking:
        SERVICE_IDLE_TIMEOUT after the launch is gone). Wait until each file ends with its exit record."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(any(r.WhichOneof("record_type") == "exit" for r in records(path)) for path in self.files):
                return
            time.sleep(0.5)
        raise AssertionError(f"W&B files without their exit record after {timeout:.0f} s: {self.files}")

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


def check_against_metrics(run_dir: Path, resumed_at: list[int], deterministic: tuple[str, ...] = ("loss", "samples"),
                          rel: float = 1e-6) -> dict[str, Any]:
    """The offline W&B run under run_dir/wandb against run_dir/metrics.jsonl, per step; returns the evidence.

    Every metrics.jsonl step is one W&B row with equal values (max difference 0), except the rows W&B
    keeps from a killed launch: the steps a launch logged past the checkpoint the next launch resumed
    from (`resumed_at`: that step, for each launch after the first). There the deterministic values (`deterministic`, and each `lr/*`) agree within `rel`
    (resume is exact; different processes) and the timings are the killed launch's own.
    """
    run = OfflineRun(Path(run_dir) / "wandb")
    history = run.history()
    plot = history[-1].pop("training_plot", None)
    expected = merged_by_step([json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line])
    steps = [row["step"] for row in history]
    assert steps == sorted(expected), (steps, sorted(expected))  # one row per step, in order, nothing else
    segments = [[r.history.step.num for r in segment if r.WhichOneof("record_type") == "history"] for segment in run.segments()]
    assert len(segments) == len(resumed_at) + 1, (len(segments), resumed_at)
    # A killed launch's rows past the next launch's checkpoint (that launch does not send them again)
    kept_from_killed = sorted(s for segment, resumed in zip(segments, resumed_at) for s in segment if s > resumed)
    got = {row["step"]: row for row in history}
    exact = [s for s in steps if s not in kept_from_killed]
    max_exact = max((max_difference(got[s], expected[s]) for s in exact), default=0.0)
    assert max_exact == 0.0, [(s, got[s], expected[s]) for s in exact if max_difference(got[s], expected[s]) != 0.0][:3]
    for s in kept_from_killed:
        assert got[s].keys() == expected[s].keys(), (s, got[s], expected[s])
        for key in got[s]:
            if key in deterministic or key.startswith("lr/"):
                assert abs(got[s][key] - expected[s][key]) <= rel * max(1.0, abs(expected[s][key])), (s, key, got[s], expected[s])
    launch_ids = [next(r.run.run_id for r in segment if r.WhichOneof("record_type") == "run") for segment in run.segments()]
    assert set(launch_ids) == {run.run_id}, launch_ids
    return {"run_id": run.run_id, "launch_run_ids": launch_ids, "launches": len(run.files), "steps": len(steps), "exact_steps": len(exact),
            "max_difference": max_exact, "kept_from_killed_launch": kept_from_killed, "plot": plot}
