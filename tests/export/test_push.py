"""`mmcl push` and `push_after_training` against a fake Hub on 127.0.0.1 (tests/export/hub_server.py).

The CLI runs in a subprocess whose environment has HF_HUB_OFFLINE unset and HF_ENDPOINT set
to the fake Hub (huggingface_hub reads both at import); HF_HOME points at an empty folder so
no saved login leaks in. Every test also checks that the token is printed nowhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import build, run_config, write_run
from hub_server import READ_TOKEN, WRITE_TOKEN, FakeHub

from mmcl.config import PushConfig
from mmcl.export import PushError, check_push_config, export_run, push_after_training

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """One small exact export (tiny ViT + BERT with its pooler) shared by the tests, which each push a copy of it."""
    root = tmp_path_factory.mktemp("push")
    config = run_config(tokenizer_dir, text_pooling="pooler_output")
    model, tokenizer = build(config)
    return export_run(write_run(root / "run", config, model, tokenizer), root / "export")


@pytest.fixture
def export_copy(export_dir, tmp_path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "export"))


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def push(folder: Path, repo_id: str, endpoint: str, home: Path, token: str | None, *options: str,
         offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home))
    if token is not None:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "mmcl.cli", "push", "--model", str(folder), "--repo-id", repo_id, *options]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_token_nowhere(token: str, *texts: str, folders: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert token not in text
    for folder in folders:
        for path in folder.rglob("*"):
            assert not path.is_file() or token.encode() not in path.read_bytes(), path


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_exactly_the_export_in_one_commit(export_copy, hub, tmp_path):
    result = push(export_copy, "me/tiny-clip", hub.url, tmp_path / "home", WRITE_TOKEN)

    assert result.returncode == 0, result.stderr
    assert [c["repo"] for c in hub.commits] == ["me/tiny-clip"] and "in one commit" in result.stdout
    received = dict(hub.repos["me/tiny-clip"]["main"])
    received.pop(".gitattributes")  # made when the repo was created
    assert received == local_files(export_copy)  # same names, same bytes
    assert 'model_id = "me/tiny-clip"' in received["README.md"].decode()  # the card's snippet now loads the repo
    assert_token_nowhere(WRITE_TOKEN, result.stdout, result.stderr, folders=(export_copy, tmp_path / "home"))


def test_push_refuses_an_inexact_export_unless_allowed(tmp_path_factory, tokenizer_dir, hub, tmp_path):
    root = tmp_path_factory.mktemp("inexact")
    config = run_config(tokenizer_dir, text_pooling="mean")  # mean pooling: transformers' text features are NaN
    model, tokenizer = build(config)
    folder = export_run(write_run(root / "run", config, model, tokenizer), root / "export")

    refused = push(folder, "me/inexact", hub.url, tmp_path / "home", WRITE_TOKEN)
    assert refused.returncode == 2 and refused.stderr.startswith("mmcl: error:")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "not exact in plain transformers on the text side" in refused.stderr and "--allow-inexact" in refused.stderr
    assert hub.requests == []  # refused before any network call

    allowed = push(folder, "me/inexact", hub.url, tmp_path / "home", WRITE_TOKEN, "--allow-inexact")
    assert allowed.returncode == 0, allowed.stderr
    assert "README.md" in hub.repos["me/inexact"]["main"]


def test_push_to_a_branch_creates_it_and_leaves_main_alone(export_copy, hub, tmp_path):
    result = push(export_copy, "me/tiny-clip", hub.url, tmp_path / "home", WRITE_TOKEN,
                  "--private", "--revision", "experiment", "--commit-message", "first try")

    assert result.returncode == 0, result.stderr
    assert hub.commits == [{"repo": "me/tiny-clip", "branch": "experiment", "message": "first try", "sha": hub.heads["me/tiny-clip"]["experiment"]}]
    assert set(hub.repos["me/tiny-clip"]["main"]) == {".gitattributes"}
    assert set(hub.repos["me/tiny-clip"]["experiment"]) - {".gitattributes"} == set(local_files(export_copy))


@pytest.mark.parametrize("case, expected", [
    ("invalid token", r"rejected the token as invalid \(401 Unauthorized\) while creating the repository.*; nothing was uploaded\.$"),
    ("read-only token, new repo", r"may not write to me/tiny-clip \(403 Forbidden\) while creating the repository.*nothing was uploaded\.$"),
    ("read-only token, existing repo", r"may not write to org/theirs \(403 Forbidden\) while uploading.*nothing was committed\.$"),
    ("no network", r"cannot reach http://127\.0\.0\.1:\d+ while creating the repository \(.*refused.*\); check the network.*nothing was uploaded\.$"),
    ("no token", r"no Hugging Face token found; set HF_TOKEN or run `hf auth login`"),
    ("offline mode", r"HF_HUB_OFFLINE is set, which blocks every upload"),
    ("incomplete export", r"is not a complete export \(model\.safetensors, tokenizer_config\.json missing\); run `mmcl export` again\.$"),
])
def test_push_errors_are_one_line_and_say_what_was_committed(export_copy, hub, tmp_path, case, expected):
    repo, token, endpoint, offline = "me/tiny-clip", WRITE_TOKEN, hub.url, False
    if case == "invalid token":
        token = "hf_thisTokenIsNotKnownToTheHub0123456789"
    elif case.startswith("read-only"):
        token = READ_TOKEN
        if case.endswith("existing repo"):
            hub.add_repo(repo := "org/theirs")
    elif case == "no network":
        endpoint = f"http://127.0.0.1:{closed_port()}"
    elif case == "no token":
        token = None
    elif case == "offline mode":
        offline = True
    elif case == "incomplete export":
        (export_copy / "model.safetensors").unlink()
        (export_copy / "tokenizer_config.json").unlink()

    result = push(export_copy, repo, endpoint, tmp_path / "home", token, offline=offline)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: "), result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert not hub.commits
    if case in ("no token", "offline mode", "incomplete export"):
        assert hub.requests == []  # refused before any network call
    assert_token_nowhere(WRITE_TOKEN, result.stdout, result.stderr)
    assert_token_nowhere(READ_TOKEN, result.stdout, result.stderr)


def test_push_after_training_exports_the_run_and_pushes_it(tmp_path, tokenizer_dir, hub, monkeypatch, capsys, caplog):
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    config = run_config(tokenizer_dir, text_pooling="pooler_output")
    config.push_to_hub = PushConfig(repo_id="me/finished-run", private=True)
    model, tokenizer = build(config)
    run = write_run(tmp_path / "run", config, model, tokenizer)

    check_push_config(config)  # what the trainer calls before training
    url = push_after_training(config, run)

    assert url.startswith(f"{hub.url}/me/finished-run/commit/")
    received = dict(hub.repos["me/finished-run"]["main"])
    received.pop(".gitattributes")
    assert received == local_files(run / "hf_export")
    assert hub.commits[0]["message"] == "Upload run trained with mmcl"
    captured = capsys.readouterr()
    assert_token_nowhere(WRITE_TOKEN, captured.out, captured.err, caplog.text, folders=(tmp_path,))


def test_check_push_config_fails_before_training_without_a_token(tmp_path, tokenizer_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    config = run_config(tokenizer_dir)
    config.push_to_hub = PushConfig(repo_id="me/x")
    with pytest.raises(PushError, match="no Hugging Face token found"):
        check_push_config(config)
    config.push_to_hub = PushConfig(repo_id="not a repo id")
    with pytest.raises(PushError, match="must look like 'org/name'"):
        check_push_config(config)


def test_push_uploads_only_the_files_the_export_consists_of(export_copy, hub, tmp_path):
    export_files = set(local_files(export_copy))
    assert json.loads((export_copy / "mmcl_export.json").read_text())["files"] == sorted(
        export_files - {"README.md"}) + ["README.md"]  # the export says what it consists of
    (export_copy / ".env").write_text("HF_TOKEN=hf_strayTokenInADotEnvFile0123\n")
    (export_copy / "mp_rank_00_model_states.pt").write_bytes(b"a checkpoint someone copied here")
    (export_copy / "global_step5").mkdir()
    (export_copy / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer state")

    result = push(export_copy, "me/tiny-clip", hub.url, tmp_path / "home", WRITE_TOKEN)

    assert result.returncode == 0, result.stderr
    received = dict(hub.repos["me/tiny-clip"]["main"])
    received.pop(".gitattributes")
    assert set(received) == export_files
    assert received == {name: data for name, data in local_files(export_copy).items() if name in export_files}
    assert result.stdout.splitlines()[-1] == ("mmcl: left out 3 entries that are not part of the export: .env, "
                                              "global_step5, mp_rank_00_model_states.pt")
    assert_token_nowhere("hf_strayTokenInADotEnvFile0123", result.stdout, result.stderr)


def test_a_failed_push_leaves_the_folder_as_it_was(export_copy, hub, tmp_path):
    before = local_files(export_copy)

    failed = push(export_copy, "me/tiny-clip", f"http://127.0.0.1:{closed_port()}", tmp_path / "home", WRITE_TOKEN)
    assert failed.returncode == 2 and "nothing was uploaded" in failed.stderr
    assert local_files(export_copy) == before  # README.md's snippet still loads "."
    assert 'model_id = "."' in before["README.md"].decode()

    pushed = push(export_copy, "me/tiny-clip", hub.url, tmp_path / "home", WRITE_TOKEN)
    assert pushed.returncode == 0, pushed.stderr
    after = local_files(export_copy)
    assert after["README.md"] == hub.repos["me/tiny-clip"]["main"]["README.md"] != before["README.md"]
    assert {k: v for k, v in after.items() if k != "README.md"} == {k: v for k, v in before.items() if k != "README.md"}


def test_push_refuses_an_export_whose_texts_hold_a_credential(export_copy, hub, tmp_path):
    config = export_copy / "mmcl_config.yaml"
    config.write_text(config.read_text().replace(
        "train_shards: null", "train_shards: https://me:pw-LeakedInOldExport@cdn.example/laion/{00000..00009}.tar"))
    assert "pw-LeakedInOldExport" in config.read_text()

    result = push(export_copy, "me/tiny-clip", hub.url, tmp_path / "home", WRITE_TOKEN)

    assert result.returncode == 2 and hub.requests == []
    assert result.stderr == (f"mmcl: error: {config} holds what looks like a credential (a token in a shard URL, header "
                             "or environment value); export the run again with this mmcl, which redacts it.\n")
