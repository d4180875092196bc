"""End to end: `train.compile` under the real `deepspeed` launcher (2 CPU ranks, inductor), and the
step-time breakdown of a run whose data source is deliberately slow.

The shards hold 2048-px PNGs that the 16-px model crops down: decoding a batch of them takes
seconds, the tiny model's step a fraction of one, so once the loader's prefetched batches
(two per worker, filled while the engine starts) are used up the run waits for data most of
the time. One eager and one compiled launch over those shards serve every check.
"""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from launch import deepspeed_command, losses, run, tiny_run_config, write_config

STEPS = 6
BIG = 2048  # px: decoding + cropping one image takes ~0.2 s; the model's step ~0.1 s per batch
PREFETCHED = 3  # steps whose batches the worker may have ready before the loop starts (2) and one to settle


@pytest.fixture(scope="module")
def slow_shards(digits, tmp_path_factory):
    """2 shards x 128 samples: the digits' captions with their images upscaled to 2048-px PNGs."""
    from PIL import Image

    from data_tools.shard_reader import iter_samples

    out = tmp_path_factory.mktemp("slow")
    big_png: dict[bytes, bytes] = {}
    samples = iter_samples(digits / "train" / "00000.tar")
    for shard in range(2):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for index in range(128):
                key, fields = next(samples)
                image_key = next(name for name in fields if name in ("png", "jpg", "jpeg", "webp"))
                small = fields[image_key]
                if small not in big_png:
                    buffer = io.BytesIO()
                    Image.open(io.BytesIO(small)).convert("RGB").resize((BIG, BIG), Image.NEAREST).save(
                        buffer, format="PNG", compress_level=1)
                    big_png[small] = buffer.getvalue()
                for name, data in ((f"{shard}_{index:04d}.png", big_png[small]),
                                   (f"{shard}_{index:04d}.txt", fields["txt"])):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / "sizes.json").write_text(json.dumps({"00000.tar": 128, "00001.tar": 128}))
    return out


@pytest.fixture(scope="module")
def runs(digits, slow_shards, tmp_path_factory):
    """{"eager": run dir, "compiled": run dir}: 6 steps each, same seed and data, losses logged every step."""
    results = {}
    for name, overrides in (("eager", ()), ("compiled", ("train.compile=true",))):
        out = tmp_path_factory.mktemp(name)
        config = tiny_run_config(digits, out / "run", steps=STEPS)
        config["data"]["train_shards"] = str(slow_shards / "{00000..00001}.tar")
        result = run(deepspeed_command(write_config(out / "run.yaml", config), "configs/ds/zero2.json", 2, *overrides))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        results[name] = (out / "run", result)
    return results


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_compiled_run_reproduces_the_eager_losses(runs):
    eager, compiled = losses(runs["eager"][0]), losses(runs["compiled"][0])
    assert sorted(compiled) == list(range(1, STEPS + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-5), (step, eager, compiled)
    assert "torch.compile: image_tower, text_tower" in runs["compiled"][1].stdout


def test_slow_data_source_shows_a_data_wait_fraction_near_one(runs):
    run_dir, result = runs["eager"]
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
    run_dir, _ = runs["eager"]
    written = {path.name for path in (run_dir / "csv").rglob("*.csv")}
    for key in ("data_s", "forward_backward_s", "optimizer_s", "data_wait_fraction"):
        assert any(key in name for name in written), (key, sorted(written))
    assert any("peak_gb" in name for name in written)
