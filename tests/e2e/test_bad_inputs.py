"""Each mistake a user can make at start-up is one clear error, before any heavy work."""
from __future__ import annotations

import os
import time

import pytest

from launch import deepspeed_command, run, tiny_run_config, write_config
from mmcl.engine.cli import main


def fails_with(capsys, config_path, *overrides) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(config_path), *overrides])
    assert caught.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def config(digits, tmp_path):
    return write_config(tmp_path / "run.yaml", tiny_run_config(digits, tmp_path / "out"))


def test_no_shards_matching(config, capsys, tmp_path):
    err = fails_with(capsys, config, f"data.train_shards={tmp_path}/nothing/{{00000..00003}}.tar")
    assert "no shard files match" in err


def test_shard_list_shorter_than_named(config, capsys, digits):
    err = fails_with(capsys, config, f"data.train_shards={digits}/train/{{00000..00009}}.tar")
    assert "6 of the 10 shards named by data.train_shards do not exist" in err


def test_tower_that_does_not_load(config, capsys, tmp_path):
    (tmp_path / "empty_tower").mkdir()
    err = fails_with(capsys, config, f"model.image.name_or_path={tmp_path}/empty_tower", "model.image.config=null")
    assert "model.image.name_or_path" in err and "empty_tower" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_not_writable(config, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = fails_with(capsys, config, f"output_dir={locked}/run")
    assert "is not writable" in err


def test_output_dir_that_is_a_file(config, capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    err = fails_with(capsys, config, f"output_dir={tmp_path}/a_file/run")
    assert "output_dir" in err and "is not writable" in err


def test_deepspeed_json_contradicting_the_run_config(config, capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--deepspeed_config", str(ds)])
    err = capsys.readouterr().err
    assert "sets train_micro_batch_size_per_gpu=4 but the run config gives 16 (train.micro_batch_size)" in err


def test_every_rank_reports_the_error_and_nobody_hangs(config, digits):
    started = time.time()
    result = run(deepspeed_command(config, "configs/ds/zero2.json", 2, f"data.train_shards={digits}/missing/{{0..3}}.tar"),
                 timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("no shard files match") == 2  # one line per rank
    assert time.time() - started < 90


def test_output_dir_holding_a_run_needs_resume(config, capsys, tmp_path):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "latest").write_text("step_00000004")
    err = fails_with(capsys, config)
    assert "already holds a run; set train.resume=latest" in err


def test_push_to_hub_that_cannot_happen_fails_before_training(config, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    err = fails_with(capsys, config, "push_to_hub={repo_id: someone/tiny-clip}")
    assert err.startswith("mmcl: error:") and len(err.strip().splitlines()) == 1
    assert "offline" in err.lower() or "token" in err.lower()


def test_push_to_hub_of_a_model_transformers_cannot_reproduce_is_refused_at_start_up(config, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_never_used")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the token and network checks pass
    err = fails_with(capsys, config, "push_to_hub={repo_id: someone/tiny-clip}")  # BERT with mean pooling
    assert err.startswith("mmcl: error:") and len(err.strip().splitlines()) == 1
    assert "text side plain transformers cannot reproduce" in err
    assert "model.text.pooling: pooler_output" in err and "push_to_hub.allow_inexact: true" in err
