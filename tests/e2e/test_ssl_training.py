"""End to end with the real `deepspeed` launcher and 2 CPU ranks: BYOL alone under ZeRO-3 (with an
exact resume, target network included), joint CLIP + SimCLR under ZeRO-2, and BYOL's EMA target
under ZeRO 1/2/3 (in the session's one launch of tests/e2e/in_process_checks.py). Three launches
of its own.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch import assert_resumed_run_matches, deepspeed_command, losses, resume_copy, run, tiny_run_config, write_config

SSL_HEADS = {"simclr": {"hidden_dim": 32, "out_dim": 16}, "byol": {"hidden_dim": 32, "out_dim": 16}}


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def knn_eval(digits) -> dict:
    return {"knn_train_shards": str(digits / "train" / "{00000..00003}.tar"),
            "knn_test_shards": str(digits / "classification" / "00000.tar")}


def byol_config(digits, output_dir) -> dict:
    config = tiny_run_config(digits, output_dir, checkpoint_every=4, keep_checkpoints=3)
    config["model"].pop("text")
    config["model"]["image"]["projection"] = "none"
    config["objectives"] = {"byol": 1.0}
    config["ssl"] = {"byol": {**SSL_HEADS["byol"], "base_momentum": 0.9}, "views": {"crop_scale": [0.5, 1.0]},
                     "sync_batchnorm": True}  # online and target heads: global-batch statistics under ZeRO-3
    config["eval"] = knn_eval(digits)
    return config


@pytest.fixture(scope="module")
def byol_zero3(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("byol_zero3")
    config = write_config(out / "run.yaml", byol_config(digits, out / "run"))
    result = run(deepspeed_command(config, "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, out / "run", result


def test_byol_under_zero3_trains_the_image_tower_and_exports_an_image_encoder(byol_zero3):
    from mmcl.evaluation.loading import mmcl_eval_model

    _, out, result = byol_zero3
    logged = records(out)
    loss = losses(out)
    assert sorted(loss) == list(range(1, 9)) and all(0 <= value <= 8 for value in loss.values())
    assert (loss[7] + loss[8]) / 2 < (loss[1] + loss[2]) / 2, loss
    momentum = [r["byol/momentum"] for r in logged if "byol/momentum" in r]
    assert momentum[0] == pytest.approx(0.9) and all(a < b for a, b in zip(momentum, momentum[1:])) and momentum[-1] < 1
    assert not any("logit_scale" in r for r in logged)  # no image-text objective
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.1 < metrics["knn/acc1"] <= 1.0  # kNN evaluated at the end on labelled shards
    assert "kNN top-1 on" in result.stdout
    # the target is saved beside every checkpoint and moved between them
    step4 = load_file(out / "checkpoints" / "step_00000004" / "task_state.safetensors")
    step8 = load_file(out / "checkpoints" / "step_00000008" / "task_state.safetensors")
    assert step4.keys() == step8.keys() and any(k.startswith("byol.momentum.tower.") for k in step8)
    assert any(not torch.equal(step4[k], step8[k]) for k in step8)
    # model/ is an image encoder (no text tower) that the evaluation commands load
    model = mmcl_eval_model(out / "model")
    features = model.encode_image(torch.randn(2, 3, 16, 16))
    assert features.shape == (2, 32) and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="no text tower"):
        model.encode_text(["a digit"])


def test_byol_resume_continues_with_identical_losses_and_target(byol_zero3, tmp_path):
    config, out, _ = byol_zero3
    resumed = resume_copy(out, tmp_path / "resumed")
    result = run(deepspeed_command(config, "configs/ds/zero3.json", 2, f"output_dir={resumed}", "train.resume=latest",
                                   "eval.knn_train_shards=null", "eval.knn_test_shards=null"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_resumed_run_matches(out, resumed, [5, 6, 7, 8])


def test_joint_clip_and_simclr_under_zero2(digits, tmp_path):
    """SLIP-style: each image gives the CLIP view and two SSL views; both losses are logged and fall;
    zero-shot and kNN evaluation; feature caching gives way to plain accumulation; the projector's
    BatchNorm over the global batch; the chunked CLIP loss."""
    config = tiny_run_config(digits, tmp_path / "run", micro_batch_size=8, grad_accum_steps=2)
    config["objectives"] = {"clip": 1.0, "simclr": 0.5}
    config["ssl"] = {"simclr": SSL_HEADS["simclr"], "sync_batchnorm": True}
    config["loss"] = {"chunk_size": 4}  # the chunked exact CLIP loss: 8 local rows x 16 global columns in 4x4 chunks
    config["eval"] = {**knn_eval(digits), "zeroshot_shards": str(digits / "classification" / "00000.tar")}
    path = write_config(tmp_path / "run.yaml", config)
    result = run(deepspeed_command(path, "configs/ds/zero2.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plain gradient accumulation" in result.stdout
    assert "image-text loss: chunked exact, 4-row chunks" in result.stdout
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    for r in logged:
        assert r["loss"] == pytest.approx(r["clip"] + 0.5 * r["simclr"], rel=1e-5)
        assert {"clip/i2t_acc", "simclr/view_acc", "logit_scale"} <= set(r)
    first, last = logged[:2], logged[-2:]
    for key in ("clip", "simclr"):
        assert sum(r[key] for r in last) < sum(r[key] for r in first), key
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"zeroshot/acc1", "knn/acc1"} <= set(metrics)
    assert "clip " in result.stdout and "simclr " in result.stdout  # the log line shows each objective


def test_byol_target_ema_under_each_zero_stage(in_process_checks):
    """Measured by byol_ema_zero.py in the session's in_process_checks.py launch."""
    stages = in_process_checks["byol_ema"]
    assert [record["stage"] for record in stages] == [1, 2, 3]
    for record in stages:
        assert record["max_error"] < 1e-6, record  # target = m * target0 + (1 - m) * whole online weights
        assert record["moved"] > 1e-6 and record["online_moved"] > 1e-5, record
        assert record["momentum"] == pytest.approx(0.9)
        assert record["ranks_equal"], record
        assert not record["target_in_engine"] and not record["target_in_optimizer"] and not record["target_has_grad"]
        assert record["target_dtype"] == "torch.float32"
