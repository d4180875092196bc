"""End to end with the real `deepspeed` launcher and 2 CPU ranks: MoCo (queue + key encoder) under
ZeRO-3 with an exact resume, and MoCo beside SimSiam, triplet and the cross-modal CLIP queue under
ZeRO-2. Three launches in all."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch import assert_resumed_run_matches, deepspeed_command, resume_copy, run, tiny_run_config, write_config

MOCO = {"hidden_dim": 32, "out_dim": 16, "queue_size": 100, "base_momentum": 0.9}  # 64 keys a step: wraps at step 2


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def moco_zero3(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("moco_zero3")
    config = tiny_run_config(digits, out / "run", checkpoint_every=4, keep_checkpoints=3)
    config["model"].pop("text")
    config["model"]["image"]["projection"] = "none"
    config["objectives"] = {"moco": 1.0}
    config["ssl"] = {"moco": MOCO, "views": {"crop_scale": [0.5, 1.0]}}
    path = write_config(out / "run.yaml", config)
    result = run(deepspeed_command(path, "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, out / "run"


def test_moco_under_zero3_saves_its_queue_and_key_encoder(moco_zero3):
    _, out = moco_zero3
    logged = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert all(r["moco/queue_filled"] == 100 for r in logged)
    momentum = [r["moco/momentum"] for r in logged]
    assert momentum[0] == pytest.approx(0.9) and all(a < b for a, b in zip(momentum, momentum[1:]))
    state = load_file(out / "checkpoints" / "step_00000008" / "task_state.safetensors")
    assert state["moco.queue.pointer"].item() == (8 * 64) % 100 and state["moco.queue.keys"].shape == (100, 16)
    assert torch.allclose(state["moco.queue.keys"].norm(dim=-1), torch.ones(100), atol=1e-5)
    assert any(key.startswith("moco.momentum.tower.") for key in state)


def test_moco_resume_gives_the_same_losses_queue_and_key_encoder(moco_zero3, tmp_path):
    config, out = moco_zero3
    resumed = resume_copy(out, tmp_path / "resumed")
    result = run(deepspeed_command(config, "configs/ds/zero3.json", 2, f"output_dir={resumed}", "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_resumed_run_matches(out, resumed, [5, 6, 7, 8], atol=1e-5)  # the queue's pointer included


def test_moco_simsiam_triplet_and_the_cross_modal_queue_train_together_under_zero2(digits, tmp_path):
    config = tiny_run_config(digits, tmp_path / "run", micro_batch_size=8)
    config["objectives"] = {"clip_queue": 1.0, "moco": 0.5, "simsiam": 0.5, "triplet": 0.5}
    config["ssl"] = {"moco": MOCO, "simsiam": {"hidden_dim": 32, "out_dim": 32, "predictor_hidden_dim": 8},
                     "triplet": {"hidden_dim": 32, "out_dim": 16}}
    config["loss"] = {"clip_queue": {"size": 40}}
    path = write_config(tmp_path / "run.yaml", config)
    result = run(deepspeed_command(path, "configs/ds/zero2.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    for r in logged:
        total = r["clip_queue"] + 0.5 * (r["moco"] + r["simsiam"] + r["triplet"])
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert -1 <= r["simsiam"] <= 1 and 0 <= r["triplet/active"] <= 1
    # the global batch is 16: the CLIP queue fills by 16 a step up to 40 (then wraps)
    assert [r["clip_queue/negatives"] for r in logged[:4]] == [15.0, 31.0, 47.0, 55.0]
    momentum = [r["clip_queue/momentum"] for r in logged]  # ALBEF's 0.995, cosine to 1
    assert momentum[0] == pytest.approx(0.995) and all(a <= b for a, b in zip(momentum, momentum[1:]))
    state = load_file(tmp_path / "run" / "checkpoints" / "step_00000008" / "task_state.safetensors")
    assert state["clip_queue.image_queue.pointer"].item() == (8 * 16) % 40
    assert {"moco.queue.keys", "clip_queue.text_queue.keys"} <= set(state)
    for name in ("image", "text"):  # every row written: the momentum towers' unit features
        assert torch.allclose(state[f"clip_queue.{name}_queue.keys"].norm(dim=-1), torch.ones(40), atol=1e-5)
