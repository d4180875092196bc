"""Engine clean-ups delete only what this run created: its universal copy, its own /dev/shm buffer."""
from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import pytest

from mmcl.engine.cli import release_shared_memory
from mmcl.engine.elastic import discard_universal, universal_folder


def test_discarding_a_universal_copy_keeps_other_conversions_and_foreign_files(tmp_path):
    root = tmp_path / "checkpoints"
    for tag in ("step_4", "step_8"):
        (universal_folder(root, tag) / "zero").mkdir(parents=True)
        (universal_folder(root, tag) / "zero" / "optimizer_state.pt").write_bytes(b"state")
    (root / "universal" / "latest_universal").write_text("step_4")
    (root / "universal" / "notes.txt").write_text("mine")
    discard_universal(root, "step_4")
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["notes.txt", "step_8"]
    discard_universal(root, "../../checkpoints")  # a tag that is not a folder name deletes nothing
    discard_universal(root, "step_8")
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["notes.txt"]
    (root / "universal" / "notes.txt").unlink()
    discard_universal(root, "step_4")  # nothing left to delete: the empty folder goes
    assert not (root / "universal").exists() and root.is_dir()


@pytest.fixture
def shm_env(monkeypatch):
    port = str(40000 + uuid.uuid4().int % 20000)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    paths = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_1") for uid in (os.getuid(), os.getuid() + 1)]
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_shared_memory_release_removes_the_buffer_this_process_maps_and_no_other(shm_env):
    ours, other_user = shm_env
    for path in shm_env:
        path.write_bytes(b"\0" * 4096)
    release_shared_memory()  # not mapped here: another job on the same port may be using it
    assert ours.exists() and other_user.exists()
    with open(ours, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        release_shared_memory()
        assert not ours.exists()
    assert other_user.exists()
