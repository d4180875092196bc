"""Shard-parallel jobs: one Parquet part per input shard, split over ranks, resumable per shard.

`mmcl curate score` and `mmcl curate reinforce` are both such a job:

    job = ShardJob(command="score", out=Path(out), urls=shard_list(pattern), manifest={...},
                   schema=SCHEMA, sample=SampleSpec(...), rows=per_batch_rows, batch_size=64)
    check_out(out, "score")                 # cheap checks first: one-sentence CurateError
    plan = plan_out(job, overwrite)         # same manifest -> resume, other -> refused (or --overwrite)
    run(job, plan, workers=2)               # joins the launcher's process group, does its shards

The output folder:

    OUT/mmcl_curate.json        the manifest: {"command", "version", ... the job's identity}
    OUT/parts/<i:05d>-<stem>.parquet
                                one file per input shard `i` of the expanded list (`::` sources
                                flattened), rows in shard order, written atomically (temporary
                                file, fsync, rename) when the shard is done; its key-value
                                metadata "mmcl" is JSON {"skips": {reason: n}, "samples": n_raw}.

Ranks: under `deepspeed` or `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment)
the process group is joined (NCCL on GPUs, gloo on the CPU) and rank 0 lists the shards without
a part; rank r does the r-th of every `world_size` of them. A killed job is resumed by running
the same command again: finished parts are kept, every other shard is done again (a part is
either complete or absent). Samples are read with mmcl's own data path (the training decode,
byte and pixel limits), so bad samples are skipped and counted by the training reasons
(`mmcl.data.samples.SKIP_REASONS`).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "mmcl_curate.json"
PARTS = "parts"
VERSION = 1
_TMP = ".tmp"  # suffix of a part being written (removed when a job starts on the folder)


from mmcl.curate.errors import CurateError  # noqa: F401  (the jobs raise it)


def say(message: str) -> None:
    """A progress line on stdout (credentials redacted)."""
    from mmcl.redact import redact

    print(f"[mmcl curate] {redact(message)}", flush=True)


# ----------------------------------------------------------------------------- shards and names


def shard_list(pattern: str) -> list[str]:
    """The expanded shard URLs of `pattern`, every `::` source flattened, in order."""
    from mmcl.data.shards import NoShardsError, expand_shards

    try:
        return [url for source in expand_shards(pattern) for url in source]
    except NoShardsError as error:
        raise CurateError(f"--shards: {error}") from None


def part_name(index: int, url: str) -> str:
    """`<index:05d>-<stem>`: the shard's file name without its .tar suffix (safe characters only)."""
    from mmcl.data.shards import _shard_name

    name = _shard_name(url) or "shard"
    stem = re.sub(r"\.(?:tar|tgz|tar\.[A-Za-z0-9]+)$", "", name)
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9._-]', '_', stem)[:100]}"


# ----------------------------------------------------------------------------- the output folder


def check_out(out: str | Path, command: str) -> None:
    """Refuse an --out that is a file, a non-empty folder mmcl curate did not write, or another command's output."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CurateError(f"--out '{out}' is a file; pass a folder (new, empty, or an earlier "
                          f"`mmcl curate {command}` output).")
    if not path.is_dir() or not any(path.iterdir()):
        return
    prior = read_manifest(path)
    if prior is None:
        raise CurateError(f"--out '{out}' is a non-empty folder that mmcl curate did not write ({MANIFEST} "
                          "missing); pass a new or empty folder.")
    if prior.get("command") != command:
        raise CurateError(f"--out '{out}' holds the output of `mmcl curate {prior.get('command')}`, not of "
                          f"`mmcl curate {command}`; pass another folder.")


def read_manifest(out: Path) -> dict | None:
    """The folder's manifest, or None when it has none (or not a JSON object)."""
    try:
        value = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class ShardJob:
    """One shard-parallel job.

    manifest: the job's identity, written to OUT/mmcl_curate.json with "command" and "version";
        a folder with an equal manifest (`identity` keys only, when given) is resumed.
    schema: the parts' pyarrow schema (columns in order).
    sample: how each raw sample is decoded (a `mmcl.data.samples.SampleSpec`; `indices` is set here).
    rows: a batch of the data path (`samples.collate`, plus `_shard`) -> the columns of its rows
        (name -> list / numpy array / pyarrow array, one entry per sample, batch order).
    """

    command: str
    out: Path
    urls: list[str]
    manifest: dict[str, Any]
    schema: Any
    sample: Any
    rows: Callable[[dict[str, Any]], dict[str, Any]]
    batch_size: int = 64
    tokenize: Callable | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    identity: tuple[str, ...] | None = None
    what: str = "output"  # what the folder holds, for messages ("scores", "a reinforced store")

    def full_manifest(self) -> dict[str, Any]:
        return {"command": self.command, "version": VERSION, **self.manifest}


@dataclass
class Plan:
    """What `plan_out` decided: start afresh (`replace`: after removing an earlier output) or resume."""

    resume: bool
    replace: bool = False


def plan_out(job: ShardJob, overwrite: bool) -> Plan:
    """Compare OUT's manifest with the job's: equal -> resume; another -> refused, or replaced with --overwrite."""
    prior = read_manifest(job.out)
    if prior is None:
        return Plan(resume=False)
    mine = job.full_manifest()
    keys = ("command", "version", *(job.identity or tuple(k for k in mine if k not in ("command", "version"))))
    if all(prior.get(k) == mine.get(k) for k in keys):
        return Plan(resume=True)
    if overwrite:
        return Plan(resume=False, replace=True)
    differ = [k for k in keys if prior.get(k) != mine.get(k)]
    raise CurateError(f"--out '{job.out}' holds {job.what} of another model, shard list or settings (its {', '.join(differ)} "
                      f"differ{'s' if len(differ) == 1 else ''}); pass another folder, or --overwrite to replace them.")


def open_out(job: ShardJob, plan: Plan) -> list[int]:
    """Prepare OUT (rank 0 only) and return the indices of the shards still to do."""
    parts = job.out / PARTS
    if plan.replace:  # only what a curate job writes: its parts, their temporaries, the manifest
        for path in parts.glob("*.parquet*"):
            path.unlink()
        (job.out / MANIFEST).unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    for path in parts.glob(f"*.parquet{_TMP}*"):  # a killed writer's leftovers
        path.unlink()
    if not plan.resume:
        _write_atomic(job.out / MANIFEST, (json.dumps(job.full_manifest(), indent=1) + "\n").encode())
    done = {p.name[:-len(".parquet")] for p in parts.glob("*.parquet")}
    return [i for i, url in enumerate(job.urls) if part_name(i, url) not in done]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f"{_TMP}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_part(path: Path, table: Any, skips: dict[str, int], samples: int) -> None:
    """`table` (sorted by `index`) as Parquet at `path`, atomically, with metadata "mmcl" = {"skips", "samples"}."""
    import pyarrow.parquet as pq

    metadata = dict(table.schema.metadata or {})
    metadata[b"mmcl"] = json.dumps({"skips": dict(sorted(skips.items())), "samples": int(samples)}).encode()
    table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(path.name + f"{_TMP}-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def part_metadata(path: str | Path) -> dict[str, Any]:
    """A part's "mmcl" metadata: {"skips": {reason: n}, "samples": n_raw}."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[b"mmcl"])


# ----------------------------------------------------------------------------- reading the shards


class _ShardBatches:
    """The data of a rank's shards, for a DataLoader: worker w reads whole shards w, w+W, ...

    Yields the batches of each shard (`samples.collate` dicts plus `_shard`: the shard's index),
    then `{"_shard": i, "_done": True, "skips": {...}, "samples": n_raw}`.
    """

    def __init__(self, job: ShardJob, shards: list[int]):
        self.job, self.shards = job, shards

    def stream_config(self, url: str) -> Any:
        from mmcl.data.pipeline import StreamConfig

        job = self.job
        return StreamConfig(sources=[[url]], weights=None, sizes=None, resampled=False, shuffle=False, shuffle_buffer=0,
                            seed=0, rank=0, world_size=1, num_workers=0, batch_size=job.batch_size, quotas=None,
                            drop_last=False, sample=job.sample, tokenize=job.tokenize, mean=job.mean, std=job.std)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import get_worker_info

        from mmcl.data.pipeline import WorkerState, worker_batches

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            meta = None
            for batch in worker_batches(self.stream_config(self.job.urls[shard]), 0, 0, WorkerState()):
                meta = batch.pop("_meta")
                if "keys" in batch:
                    batch["_shard"] = shard
                    yield batch
            yield {"_shard": shard, "_done": True, "skips": dict(meta["skips"]) if meta else {},
                   "samples": int(meta["cursor"]) if meta else 0}


def _ignore_stop_signals(worker_id: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(job: ShardJob, shards: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """The items of `_ShardBatches` over `shards`, read by `workers` DataLoader processes (0: in this one)."""
    from torch.utils.data import DataLoader, IterableDataset

    source = _ShardBatches(job, shards)
    if workers == 0 or not shards:
        yield from source
        return

    class Dataset(IterableDataset):
        def __iter__(self):
            return iter(source)

    yield from DataLoader(Dataset(), batch_size=None, num_workers=min(workers, len(shards)), persistent_workers=False,
                          worker_init_fn=_ignore_stop_signals)


# ----------------------------------------------------------------------------- ranks


@dataclass
class RankStats:
    """What one rank did: parts written, good samples, raw samples, skips, seconds."""

    rank: int = 0
    parts: int = 0
    samples: int = 0
    raw: int = 0
    skips: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def launched() -> bool:
    """True under a launcher that set up more than one rank (deepspeed, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for_rank() -> Any:
    """This rank's device: cuda:LOCAL_RANK when GPUs are present, else the CPU."""
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def join_process_group(device: Any) -> None:
    """Join the launcher's process group (env://), NCCL on a GPU, gloo on the CPU; nothing without a launcher."""
    import torch.distributed as dist

    from mmcl.distributed import note_joined

    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        note_joined()


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(job: ShardJob, plan: Plan, workers: int = 0, label: str = "scored") -> list[RankStats]:
    """Do this rank's shards of `job` (see the module docstring) and return every rank's stats (rank order).

    The process group must be joined already (or there is none). Rank 0 prepares OUT and lists
    the shards to do; each rank writes the parts of its share; rank 0 prints the summary.
    """
    import pyarrow as pa
    import torch.distributed as dist

    from mmcl.distributed import get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    todo = open_out(job, plan) if rank == 0 else None
    if world > 1:
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    assert todo is not None
    mine = todo[rank::world]
    if rank == 0:
        kept = len(job.urls) - len(todo)
        say(f"{len(job.urls)} shards: {kept} parts already written, {len(todo)} to do over {world} rank(s)"
            + (" (resumed)" if plan.resume and kept else ""))
    stats = RankStats(rank=rank)
    pending: dict[int, list[Any]] = {}
    start = time.perf_counter()
    for item in batches(job, mine, workers):
        shard = item["_shard"]
        if not item.get("_done"):
            columns = job.rows(item)
            pending.setdefault(shard, []).append(pa.RecordBatch.from_arrays(
                [_array(columns[f.name], f.type) for f in job.schema], schema=job.schema))
            continue
        table = pa.Table.from_batches(pending.pop(shard, []), schema=job.schema)
        table = table.sort_by("index") if table.num_rows else table
        name = part_name(shard, job.urls[shard])
        write_part(job.out / PARTS / f"{name}.parquet", table, item["skips"], item["samples"])
        stats.parts += 1
        stats.samples += table.num_rows
        stats.raw += item["samples"]
        for reason, count in item["skips"].items():
            stats.skips[reason] = stats.skips.get(reason, 0) + int(count)
        stats.seconds = time.perf_counter() - start
        skipped = sum(item["skips"].values())
        say(f"rank {rank}: {name} done, {table.num_rows} samples {label}"
            + (f", {skipped} skipped ({_counts(item['skips'])})" if skipped else "")
            + f" [{stats.parts}/{len(mine)} of this rank, {stats.rate:.1f} samples/s]")
    stats.seconds = time.perf_counter() - start
    every = [stats]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, stats.__dict__)
        every = [RankStats(**s) for s in gathered]
    if rank == 0:
        summarize(job, every, label)
    return every


def _array(values: Any, type_: Any) -> Any:
    import numpy as np
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if pa.types.is_fixed_size_list(type_):
        flat = np.ascontiguousarray(values).reshape(-1).astype(type_.value_type.to_pandas_dtype(), copy=False)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=type_.value_type), type_.list_size)
    return pa.array(values, type=type_)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()) if n) or "none"


def summarize(job: ShardJob, every: list[RankStats], label: str) -> None:
    """Rank 0's closing lines: this run's samples, skips by reason, samples/s per rank; the folder's totals."""
    samples = sum(s.samples for s in every)
    skips: dict[str, int] = {}
    for s in every:
        for reason, n in s.skips.items():
            skips[reason] = skips.get(reason, 0) + n
    parts = sorted((job.out / PARTS).glob("*.parquet"))
    total = sum(_rows(p) for p in parts)
    say(f"this run: {samples} samples {label} in {sum(s.parts for s in every)} parts; skipped: {_counts(skips)}; "
        "samples/s per rank: " + ", ".join(f"rank {s.rank} {s.rate:.1f}" for s in every))
    say(f"{job.out} holds {len(parts)}/{len(job.urls)} parts, {total} samples")


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


