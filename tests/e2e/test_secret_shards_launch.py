"""Secrets never leave the machine: one real `deepspeed` launch (2 CPU ranks) whose shard strings
carry credentials, exported and pushed to the fake Hub (tests/export/hub_server.py).

The loopback server serves shards only to a request with basic auth `reader:SECRET1` and
`?token=SECRET2`, or with `Authorization: Bearer SECRET3`. The run's YAML names the training
shards `http://reader:SECRET1@.../{00000..00003}.tar?token=${SHARD_TOKEN}` (SECRET2 comes from
the environment, mmcl expands it) and its retrieval shards
`pipe:curl -H "Authorization: Bearer $SHARD_BEARER" ...` (SECRET3, the shell expands it). The
run trains (steps from the shards' stats), evaluates on the pipe shards and pushes at the end
(push_to_hub); then `mmcl export` and `mmcl push` run as commands. No secret, nor the Hub token,
is in any file of the run or export folders, in anything uploaded, or in any output line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from guarded_server import SECRET1, SECRET2, SECRET3, serve_guarded
from launch import BIN, REPO, free_port, losses, run, tiny_run_config, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from hub_server import WRITE_TOKEN, FakeHub  # noqa: E402

SECRETS = (SECRET1, SECRET2, SECRET3, WRITE_TOKEN)
SIZES = [24, 24, 24, 8]  # 80 samples: 5 steps of 2 ranks x 8
MICRO = 8


@pytest.fixture(scope="module")
def guarded(digits, tmp_path_factory):
    """host:port of a server over 4 JPEG training shards with img2dataset's stats and one retrieval shard."""
    from data_tools.samples import ImageOptions, SourceItem
    from data_tools.shard_reader import iter_samples
    from data_tools.write_shards import write_shards

    root = tmp_path_factory.mktemp("guarded_root")
    items = []
    for key, fields in iter_samples(digits / "train" / "00000.tar"):
        items.append(SourceItem(source=key, image=fields["png"], captions=(fields["txt"].decode(),)))
        if len(items) == sum(SIZES):
            break
    write_shards(items, root / "i2d", samples_per_shard=24, image_options=ImageOptions(output_format="jpg"))
    (root / "i2d" / "sizes.json").unlink()
    (root / "val").mkdir()
    (root / "val" / "00000.tar").write_bytes((digits / "val" / "00000.tar").read_bytes())
    with serve_guarded(root) as host:
        yield host


def secret_config(digits: Path, tmp_path: Path, host: str) -> Path:
    config = tiny_run_config(digits, tmp_path / "run", micro_batch_size=MICRO, epochs=1, log_every=1)
    del config["train"]["steps"]
    config["data"]["train_shards"] = f"http://reader:{SECRET1}@{host}/i2d/{{00000..00003}}.tar?token=${{SHARD_TOKEN}}"
    config["eval"] = {"retrieval_shards": f'pipe:curl -s -f -H "Authorization: Bearer $SHARD_BEARER" http://{host}/val/00000.tar',
                      "batch_size": 200}
    config["push_to_hub"] = {"repo_id": "me/secret-run", "allow_inexact": True}
    config["log"] = {"wandb": {"mode": "offline"}}  # W&B's files (run_dir/wandb) are searched for the secrets too
    return write_config(tmp_path / "run.yaml", config)  # the user's own file, outside the run folder


def hub_env(hub: FakeHub, home: Path) -> dict:
    return {"SHARD_TOKEN": SECRET2, "SHARD_BEARER": SECRET3, "HF_TOKEN": WRITE_TOKEN, "HF_ENDPOINT": hub.url,
            "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}


def files_holding_secrets(*folders: Path) -> list[str]:
    return [f"{p}: {s}" for folder in folders for p in folder.rglob("*") if p.is_file()
            for s in SECRETS if s.encode() in p.read_bytes()]


def test_a_run_with_credentials_in_its_shards_trains_exports_and_pushes_without_leaking_them(guarded, digits, tmp_path):
    host = guarded
    home = tmp_path / "hf_home"
    with FakeHub() as hub:
        env = hub_env(hub, home)
        launch = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "train.py"),
                  "--config", str(secret_config(digits, tmp_path, host)), "--deepspeed_config", str(REPO / "configs/ds/zero2.json")]
        trained = run(launch, timeout=900, extra_env=env)
        assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
        run_dir = tmp_path / "run"
        assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]  # the epoch's length came from the guarded stats files
        metrics = json.loads((run_dir / "metrics.json").read_text())
        recalls = [value for key, value in metrics.items() if key.startswith("retrieval/")]
        assert recalls and max(recalls) > 0  # the pipe: shards were read, with the token the shell filled in

        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["data"]["train_shards"] == f"http://***@{host}/i2d/{{00000..00003}}.tar?token=${{SHARD_TOKEN}}"
        assert saved["eval"]["retrieval_shards"] == f'pipe:curl -s -f -H "Authorization: Bearer $SHARD_BEARER" http://{host}/val/00000.tar'
        from wandb_history import OfflineRun

        assert OfflineRun(run_dir / "wandb").config() == saved  # W&B got config.yaml's redaction, no more

        cli_env = {**os.environ, **env}
        cli_env.pop("TRANSFORMERS_OFFLINE", None)
        exported = subprocess.run([sys.executable, "-m", "mmcl.cli", "export", "--run", str(run_dir), "--out", str(tmp_path / "export")],
                                  cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
        assert exported.returncode == 0, exported.stderr
        pushed = subprocess.run([sys.executable, "-m", "mmcl.cli", "push", "--model", str(tmp_path / "export"),
                                 "--repo-id", "me/secret-export", "--allow-inexact"],
                                cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 0, pushed.stderr

        logs = tmp_path / "logs"  # kept for inspection (outside the run and export folders)
        logs.mkdir()
        for name, result in (("train", trained), ("export", exported), ("push", pushed)):
            (logs / f"{name}.out").write_text(result.stdout)
            (logs / f"{name}.err").write_text(result.stderr)

        assert set(hub.repos) == {"me/secret-run", "me/secret-export"}
        card = hub.repos["me/secret-export"]["main"]["README.md"].decode()
        assert f"Data: `http://***@{host}/i2d/{{00000..00003}}.tar?token=${{SHARD_TOKEN}}` (4 shards" in card
        assert f'retrieval on `pipe:curl -s -f -H "Authorization: Bearer $SHARD_BEARER" http://{host}/val/00000.tar`' in card
        uploaded = [f"{repo}/{name}: {s}" for repo, branches in hub.repos.items() for name, data in branches["main"].items()
                    for s in SECRETS if s.encode() in data]
        assert uploaded == []
        assert files_holding_secrets(run_dir, tmp_path / "export", home, logs) == []
        for output in (trained.stdout, trained.stderr, exported.stdout, exported.stderr, pushed.stdout, pushed.stderr):
            assert not [s for s in SECRETS if s in output]


def test_wds_secure_refuses_the_pipe_shards_before_training(guarded, digits, tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    from mmcl.engine.cli import main

    host = guarded
    monkeypatch.setenv("WDS_SECURE", "1")
    monkeypatch.setenv("SHARD_TOKEN", SECRET2)
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(secret_config(digits, tmp_path, host)), "push_to_hub=null"])
    assert caught.value.code == 2 and not dist.is_initialized()
    assert capsys.readouterr().err == (
        f"mmcl: error: eval.retrieval_shards source 'pipe:curl -s -f -H \"Authorization: Bearer $SHARD_BEARER\" "
        f"http://{host}/val/00000.tar' is a pipe: command, which WDS_SECURE=1 forbids; unset WDS_SECURE or name the "
        "shards by URL (http(s)://, s3://...).\n")
    assert not (tmp_path / "run" / "checkpoints").exists()
