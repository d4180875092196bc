"""End to end: `train.compile` under the real `deepspeed` launcher (2 CPU ranks, inductor) against
the same run eager, and the step-time breakdown of a run whose data source is deliberately slow.

The eager run is the session's ZeRO-2 reference run (tests/e2e/conftest.py: zero_runs, 16 steps);
the compiled run is launched from its config with `train.compile=true` (and without its
evaluation and intermediate checkpoints, which do not touch the losses).

The slow data source is the digits' shards read through a `pipe:` URL that trickles them in
(tests/e2e/slow_cat.py: 2 KB every 0.1 s, a 4.6 KB sample about every 0.23 s): the worker waits on the
pipe, not on the CPU, so the run waits for data most of the time however busy the machine is.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch import NO_EVAL, ZERO_STAGES, ZERO_STEPS, deepspeed_command, losses, python_command, run, tiny_run_config, write_config

STEPS = 6  # of the slow run
SLOW_MICRO_BATCH = 8  # 8 samples of ~0.23 s each: ~1.8 s of waiting per step against ~0.05 s of compute
PREFETCHED = 3  # steps whose batches the worker may have ready before the loop starts (2) and one to settle
SLOW_CAT = Path(__file__).with_name("slow_cat.py")


@pytest.fixture(scope="module")
def runs(digits, zero_runs, tmp_path_factory):
    """{"eager", "compiled": (run dir, result)}: 2 ranks over the digits, same config and seed, losses every step
    ("eager" is the session's ZeRO-2 reference run); "slow": one rank (`python train.py`) over the slowly arriving
    digits (one rank: with two, a rank's wait for the other's data happens inside the forward's all-gather and is
    charged to forward+backward)."""
    config, eager_dir, eager_result = zero_runs[2]
    results = {"eager": (eager_dir, eager_result)}
    out = tmp_path_factory.mktemp("compiled")
    result = run(deepspeed_command(config, ZERO_STAGES[2], 2, f"output_dir={out / 'run'}", "train.compile=true",
                                   "train.checkpoint_every=0", *NO_EVAL))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results["compiled"] = (out / "run", result)

    slow = f"pipe:{sys.executable} {SLOW_CAT} {digits}/train/{{00000..00003}}.tar 2048 0.1"
    out = tmp_path_factory.mktemp("slow")
    config = tiny_run_config(digits, out / "run", steps=STEPS, micro_batch_size=SLOW_MICRO_BATCH)
    config["data"]["train_shards"] = slow
    config["data"]["shuffle_buffer"] = 0  # no 64-sample buffer to fill (~15 s of trickle) before the first batch
    # the one-rank run needs no launcher: its checks are the step-time breakdown and the monitor
    result = run(python_command(write_config(out / "run.yaml", config), "configs/ds/zero2.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results["slow"] = (out / "run", result)
    return results


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_compiled_run_reproduces_the_eager_losses(runs):
    eager, compiled = losses(runs["eager"][0]), losses(runs["compiled"][0])
    assert sorted(compiled) == sorted(eager) == list(range(1, ZERO_STEPS[2] + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-5), (step, eager, compiled)
    assert "torch.compile: image_tower, text_tower" in runs["compiled"][1].stdout


def test_slow_data_source_shows_a_data_wait_fraction_near_one(runs):
    run_dir, result = runs["slow"]
    logged = [record for record in records(run_dir) if "loss" in record]
    assert [record["step"] for record in logged] == list(range(1, STEPS + 1))
    for record in logged:
        parts = record["time/data_s"] + record["time/forward_backward_s"] + record["time/optimizer_s"]
        if record["step"] > PREFETCHED:
            assert record["time/data_wait_fraction"] > 0.8, record
        assert record["time/data_wait_fraction"] == pytest.approx(record["time/data_s"] / record["time/window_s"], rel=1e-6)
        # Every second of the window is in one of the three parts, save the loop's bookkeeping.
        assert parts == pytest.approx(record["time/window_s"], rel=0.1, abs=0.05), record
        assert record["time/forward_backward_s"] > 0 and record["time/optimizer_s"] > 0
        assert 0.05 < record["memory/peak_gb"] < 24  # a Python process with torch loaded: >50 MB resident
    assert f"[mmcl] step {STEPS}/{STEPS}" in result.stdout and " fwd+bwd " in result.stdout and " peak " in result.stdout


def test_step_time_breakdown_reaches_the_monitor(runs):
    """DeepSpeed's monitor (TensorBoard, CSV) gets the same keys as metrics.jsonl."""
    run_dir, _ = runs["slow"]
    written = {path.name for path in (run_dir / "csv").rglob("*.csv")}
    for key in ("data_s", "forward_backward_s", "optimizer_s", "data_wait_fraction"):
        assert any(key in name for name in written), (key, sorted(written))
    assert any("peak_gb" in name for name in written)
