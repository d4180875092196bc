"""`mmcl curate score` under the `deepspeed` launcher with 2 CPU ranks, killed with SIGKILL mid-way and resumed by rerunning
the same command: every sample is scored exactly once and every column equals a one-process run's
(embeddings bit for bit; the reference runs in this process with one thread, as the ranks do). The shards come through `pipe:` commands that wait before each shard, so the
kill lands between the first part and the last. One launch pair for all the checks."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from curate_helpers import write_shards
from mmcl.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from launch import BIN, free_port, kill_tree, run, start, wait_for  # noqa: E402

SHARDS = 16
PER_SHARD = 6


def command(launcher: list[str], clip_dir: Path, pattern: str, out: Path, workers: int) -> list[str]:
    return [*launcher, str(BIN / "mmcl"), "curate", "score", "--model", str(clip_dir), "--shards", pattern,
            "--out", str(out), "--batch-size", "4", "--workers", str(workers)]


def deepspeed() -> list[str]:
    """The launcher starts its ranks in its own process group (torchrun's get sessions of their own),
    so killing the group kills every rank and data worker at once, as a node failure would."""
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def parts(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("*.parquet")) if (out / "parts").is_dir() else []


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, clip_dir):
    root = tmp_path_factory.mktemp("score_launch")
    _, good = write_shards(root / "shards", SHARDS, PER_SHARD)
    pattern = f"pipe:sleep 0.3; cat {root / 'shards'}/{{00000..{SHARDS - 1:05d}}}.tar"
    out = root / "ranks"
    first = start(command(deepspeed(), clip_dir, pattern, out, workers=1))
    try:
        wait_for(lambda: len(parts(out)) >= 1 or first.poll() is not None, timeout=240, what="the first part")
    finally:
        kill_tree(first, signal.SIGKILL)
        killed_output = first.communicate()[0]
    at_kill = len(parts(out))
    before = {path.name: path.read_bytes() for path in parts(out)}  # the parts finished before the kill
    resumed = run(command(deepspeed(), clip_dir, pattern, out, workers=1), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(command([], clip_dir, pattern, root / "single", workers=2)[1:]) == 0
    finally:
        torch.set_num_threads(threads)
    print(f"\nkilled after {at_kill} of {SHARDS} parts; the rerun wrote {SHARDS - at_kill}")
    kept = {name: (out / "parts" / name).read_bytes() == data for name, data in before.items()}
    return good, root / "single", out, at_kill, killed_output, resumed.stdout, kept


def table(out: Path):
    return ds.dataset([str(p) for p in parts(out)], format="parquet").to_table()


def test_the_kill_landed_after_the_first_part_and_before_the_last(killed_and_resumed):
    _, _, _, at_kill, killed_output, resumed_output, kept = killed_and_resumed
    assert 1 <= at_kill < SHARDS, killed_output[-2000:]
    assert len(kept) == at_kill and all(kept.values()), kept  # finished parts are kept as they were, not redone
    assert f"{SHARDS} shards: {at_kill} parts already written, {SHARDS - at_kill} to do over 2 rank(s) (resumed)" \
        in resumed_output
    assert "samples/s per rank: rank 0" in resumed_output and ", rank 1 " in resumed_output


def test_every_sample_is_scored_exactly_once_after_the_resume(killed_and_resumed):
    good, _, out, *_ = killed_and_resumed
    assert len(parts(out)) == SHARDS
    keys = table(out).column("key").to_pylist()
    assert keys == good  # parts in shard order, rows in shard order: each good sample once


def test_the_resumed_two_rank_scores_equal_a_one_process_run_bit_for_bit(killed_and_resumed):
    _, single, out, *_ = killed_and_resumed
    assert [p.name for p in parts(out)] == [p.name for p in parts(single)]
    reference, resumed = table(single), table(out)
    assert resumed.schema.equals(reference.schema)
    for name in reference.column_names:
        assert resumed.column(name).equals(reference.column(name)), name
