"""Elastic resume end to end: the real `deepspeed` launcher, CPU gloo ranks, ZeRO 1/2/3.

Per ZeRO stage, one run at 2 ranks is interrupted mid-epoch (SIGTERM, or kill -9), and its
checkpoint is resumed at 1 rank and at 4 ranks with the same global batch (one case also with
another data.num_workers, one with train.allow_batch_change). The 1-rank resumes run as `python
train.py` (DeepSpeed's engine without its launcher, as tests/e2e/test_launchers.py runs it): what
they check is the re-partitioned state and data, not the launcher, which the 2- and 4-rank launches use. Every run logs each step's
sample keys per rank (MMCL_DEBUG_DIR) and saves its state right after loading, so the checks
read the interrupted epoch's coverage from the keys and compare the re-partitioned fp32
weights and Adam moments with the checkpoint's through DeepSpeed's universal format. The
figures README quotes come from `benchmarks/elastic_resume.py`, which runs the same launches.
"""
from __future__ import annotations

import json
import math
import signal
import tarfile
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest

from launch import (deepspeed_command, kill_tree, latest_tag, losses, python_command, resume_copy, run, start,
                    tiny_run_config, wait_for, write_config)

STAGES = {1: "configs/ds/zero1.json", 2: "configs/ds/zero2.json", 3: "configs/ds/zero3.json"}
SHARDS, PER_SHARD, GLOBAL_BATCH = 8, 24, 16
EPOCH_STEPS = SHARDS * PER_SHARD // GLOBAL_BATCH  # 12
SIGNAL = {1: signal.SIGTERM, 2: signal.SIGKILL, 3: signal.SIGTERM}
# (ranks, micro batch, data.num_workers, extra overrides) of the two resumes of each stage
RESUMES = {
    1: [(1, 16, 2, []), (4, 4, 1, [])],
    2: [(1, 16, 1, []), (4, 4, 1, [])],
    3: [(1, 8, 1, ["train.allow_batch_change=true"]), (4, 4, 1, [])],  # 1 rank: global batch 16 -> 8
}


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """The demo digits in shards of 24 (the first 8 shards: 192 samples, 12 global batches of 16)."""
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits24")
    build_demo(out, image_size=16, samples_per_shard=PER_SHARD)
    return out


def epoch_keys(data: Path) -> set[str]:
    keys = set()
    for s in range(SHARDS):
        with tarfile.open(data / "train" / f"{s:05d}.tar") as tar:
            keys.update(name.split(".")[0] for name in tar.getnames())
    return keys


def logged_keys(debug_dir: Path, up_to: int | None = None) -> list[str]:
    """Every key the ranks of one run logged, for steps <= up_to (all when None)."""
    keys = []
    for path in sorted(debug_dir.glob("keys_rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if up_to is None or record["step"] <= up_to:
                keys += record["keys"]
    return keys


def step_keys(debug_dir: Path) -> dict[int, int]:
    counts: Counter = Counter()
    for path in debug_dir.glob("keys_rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            counts[record["step"]] += len(record["keys"])
    return dict(counts)


def universal_state(checkpoint: Path, out: Path) -> dict[str, dict]:
    """param name -> {fp32, exp_avg, exp_avg_sq}: DeepSpeed's consolidated (universal) form of a checkpoint."""
    import contextlib
    import io

    import torch
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    state = {}
    for folder in (out / "zero").iterdir():
        if folder.is_dir():
            files = {f.stem: torch.load(f, weights_only=False) for f in folder.glob("*.pt")
                     if f.stem in ("fp32", "exp_avg", "exp_avg_sq")}
            # ZeRO 1/2 conversions store {"param": tensor, ...}, ZeRO-3's the tensor itself
            state[folder.name] = {k: (v["param"] if isinstance(v, dict) else v).detach().float() for k, v in files.items()}
    return state


def coverage(expected: set[str], before: list[str], debug: Path) -> dict:
    """The interrupted epoch's samples: expected, seen (before the checkpoint + after the resume), seen twice."""
    seen = Counter(before + logged_keys(debug))
    return {"expected": len(expected), "seen": len(seen), "duplicated": sum(n - 1 for n in seen.values()),
            "missing": len(expected - set(seen)), "unexpected": len(set(seen) - expected)}


def max_differences(first: Path, interrupted_at: int, resumes: list, out: Path) -> dict[str, float]:
    """The largest |loaded - saved| of the fp32 weights and Adam moments over the resumes of one run."""
    saved = universal_state(first / "checkpoints" / f"step_{interrupted_at:08d}", out / "saved")
    assert saved and all(set(v) == {"fp32", "exp_avg", "exp_avg_sq"} for v in saved.values())
    assert sum(float(v["exp_avg_sq"].abs().sum()) for v in saved.values()) > 0  # real moments, not a fresh optimizer
    worst = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    for ranks, _, _, _, debug, _ in resumes:
        loaded = universal_state(debug / "after_resume", out / f"loaded{ranks}")
        assert loaded.keys() == saved.keys()
        for name, tensors in saved.items():
            for key, tensor in tensors.items():
                assert loaded[name][key].shape == tensor.shape, (name, key)
                worst[key] = max(worst[key], float((loaded[name][key] - tensor).abs().max()))
    return worst


@pytest.fixture(scope="module")
def elastic_runs(small_digits, tmp_path_factory):
    """Per stage: the interrupted 2-rank run and its two resumes (outputs + debug folders)."""
    return launch_elastic_runs(small_digits, lambda name: tmp_path_factory.mktemp(name))


def launch_elastic_runs(small_digits: Path, new_dir) -> dict:
    """The launches of `elastic_runs`; `new_dir(name)` gives a fresh folder."""
    runs = {}
    for stage, ds_json in STAGES.items():
        base = new_dir(f"elastic{stage}")
        config = tiny_run_config(small_digits, base / "run", micro_batch_size=GLOBAL_BATCH // 2, steps=EPOCH_STEPS,
                                 checkpoint_every=2, keep_checkpoints=10)
        config["data"]["train_shards"] = str(small_digits / "train" / f"{{00000..{SHARDS - 1:05d}}}.tar")
        config["optim"]["lr"] = 5e-3
        config_path = write_config(base / "run.yaml", config)
        first = base / "run"
        process = start(deepspeed_command(config_path, ds_json, 2), extra_env={"MMCL_DEBUG_DIR": str(base / "debug0")})
        wait_for(lambda: latest_tag(first) is not None, timeout=1500, what="first checkpoint")
        kill_tree(process, SIGNAL[stage])
        output, _ = process.communicate(timeout=120)
        tag = latest_tag(first)
        interrupted_at = int(tag.split("_")[1])
        assert 2 <= interrupted_at < EPOCH_STEPS, f"not interrupted mid-epoch (at {tag}): {output[-2000:]}"
        if SIGNAL[stage] == signal.SIGTERM:
            assert "stop requested: saved step" in output, output[-3000:]
        resumes = []
        for index, (ranks, micro, workers, extra) in enumerate(RESUMES[stage]):
            target = resume_copy(first, base / f"resume{index}", tag)
            debug = base / f"debug{index + 1}"
            overrides = (f"output_dir={target}", "train.resume=latest", f"train.micro_batch_size={micro}",
                         f"data.num_workers={workers}", *extra)
            # one rank needs no launcher (~7 s of interpreter starts saved per launch)
            command = (python_command(config_path, ds_json, *overrides) if ranks == 1
                       else deepspeed_command(config_path, ds_json, ranks, *overrides))
            result = run(command, timeout=1500, extra_env={"MMCL_DEBUG_DIR": str(debug)})  # generous: 4 ranks on 2 cores
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            resumes.append((ranks, micro, workers, target, debug, result))
        runs[stage] = (first, base / "debug0", interrupted_at, resumes, base)
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_interrupted_epoch_is_seen_once_on_1_and_4_ranks(elastic_runs, small_digits, stage):
    first, debug0, interrupted_at, resumes, _ = elastic_runs[stage]
    expected = epoch_keys(small_digits)
    before = logged_keys(debug0, up_to=interrupted_at)  # a kill -9 loses the steps after the checkpoint
    assert len(before) == interrupted_at * GLOBAL_BATCH
    for ranks, micro, workers, target, debug, result in resumes:
        assert "elastic resume from" in result.stdout and f"world size 2 -> {ranks}" in result.stdout
        per_step = step_keys(debug)
        steps_left = len(per_step)
        batch = sum(per_step.values()) // steps_left
        assert batch == ranks * micro
        # the rest of epoch 0 is exactly the remaining samples, in the new global batches
        assert steps_left == (EPOCH_STEPS - interrupted_at) * GLOBAL_BATCH // batch
        figures = coverage(expected, before, debug)
        assert figures == {"expected": len(expected), "seen": len(expected), "duplicated": 0, "missing": 0, "unexpected": 0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_weights_and_adam_moments_equal_the_checkpoint_after_repartitioning(elastic_runs, stage, tmp_path):
    first, _, interrupted_at, resumes, _ = elastic_runs[stage]
    assert max_differences(first, interrupted_at, resumes, tmp_path) == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_training_continues_with_finite_decreasing_losses(elastic_runs, stage):
    first, _, interrupted_at, resumes, _ = elastic_runs[stage]
    start_losses = losses(first)
    opening = (start_losses[1] + start_losses[2]) / 2
    for ranks, micro, _, target, _, result in resumes:
        got = losses(target)
        steps = sorted(got)
        assert steps[0] == interrupted_at + 1  # the step counter continues
        assert all(math.isfinite(v) for v in got.values())
        assert (got[steps[-1]] + got[steps[-2]]) / 2 < opening - 0.05, (start_losses, got)
        if ranks * micro != GLOBAL_BATCH:  # allow_batch_change: the remaining samples in the new batches
            assert "train.allow_batch_change: global batch 16 -> 8" in result.stdout
            assert steps[-1] == interrupted_at + (EPOCH_STEPS - interrupted_at) * 2


def test_a_changed_global_batch_is_refused_before_training(elastic_runs, tmp_path):
    first, _, interrupted_at, _, base = elastic_runs[1]
    target = resume_copy(first, tmp_path / "run", f"step_{interrupted_at:08d}")
    import sys

    from launch import REPO

    # a plain one-process launch (what `python train.py` gives): refused before any process group
    result = run([sys.executable, str(REPO / "train.py"), "--config", str(base / "run.yaml"), "--deepspeed_config",
                  str(REPO / STAGES[1]), f"output_dir={target}", "train.resume=latest"])
    assert result.returncode != 0
    assert ("mmcl: error: the checkpoint was trained with a global batch of 16 and this launch has 8 "
            "(micro x accumulation x world size); keep 16 or set train.allow_batch_change=true.") in result.stderr
