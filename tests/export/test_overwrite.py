"""`--out` / `--overwrite` of `mmcl export` and `mmcl convert`: what they refuse, and the atomic replace.

Every refusal is one line before any work, and the file the case protects is still there after it.
The replace is killed (SIGKILL) between each of its steps in a real subprocess; the output is then
whole, old or new, and the next run recovers what the kill left.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import build, run_config, write_run

from mmcl.cli import main as mmcl_main
from mmcl.export import ExportError, export_run, load_exported
from mmcl.export.staging import WORK_INFIX, WORK_MARKER, check_out, recover

REPO = Path(__file__).resolve().parents[2]


def refusal(argv: list[str], capsys) -> str:
    """Run `mmcl ARGV`, which must fail as a user error; returns its one line."""
    assert mmcl_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmcl: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """A finished run with a checkpoints/ folder holding a file to protect: <root>/runs/run."""
    config = run_config(tokenizer_dir)
    model, tokenizer = build(config)
    folder = write_run(tmp_path_factory.mktemp("root") / "runs" / "run", config, model, tokenizer)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "keep.txt").write_text("checkpoint")
    return folder


def export_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["symlink", "root", "home", "above home", "cwd", "above cwd", "run", "above run",
                                  "run's model", "inside run's model", "inside checkpoints", "foreign folder",
                                  "file", "parent is a file"])
def test_overwrite_refuses_anything_but_an_earlier_mmcl_output_in_one_line_and_deletes_nothing(case, run, tmp_path,
                                                                                                monkeypatch, capsys):
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "data.txt").write_text("mine")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(keep / "sub")
    (tmp_path / "link").symlink_to(keep, target_is_directory=True)
    (tmp_path / "a_file").write_text("mine")
    out, protected, expected = {
        "symlink": (tmp_path / "link", keep / "data.txt", "is a symbolic link"),
        "root": ("/", None, "is the root folder"),
        "home": ("~", home / "notes.txt", "is your home folder"),
        "above home": (tmp_path, home / "notes.txt", "is a folder above your home folder"),
        "cwd": (".", keep / "data.txt", "is the current folder"),
        "above cwd": ("..", keep / "data.txt", "is a folder above the current folder"),
        "run": (run, run / "model" / "model.safetensors", "is the run folder"),
        "above run": (run.parent, run / "model" / "model.safetensors", "is a folder above the run folder"),
        "run's model": (run / "model", run / "model" / "model.safetensors", "is the source"),
        "inside run's model": (run / "model" / "tokenizer", run / "model" / "tokenizer" / "tokenizer.json", "is inside the source"),
        "inside checkpoints": (run / "checkpoints" / "export", run / "checkpoints" / "keep.txt", "is inside the source"),
        "foreign folder": (keep, keep / "data.txt", "is a non-empty folder that mmcl did not write"),
        "file": (tmp_path / "a_file", tmp_path / "a_file", "is an existing file"),
        "parent is a file": (tmp_path / "a_file" / "export", tmp_path / "a_file", "is a file, not a folder"),
    }[case]
    if case == "foreign folder":
        monkeypatch.chdir(home)
    kept = protected.read_bytes() if protected is not None else None
    before = sorted(os.listdir("/"))
    err = refusal(["export", "--run", str(run), "--out", str(out), "--overwrite"], capsys)
    assert expected in err
    if protected is not None:
        assert protected.read_bytes() == kept
    assert (keep / "data.txt").read_text() == "mine" and (home / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "keep.txt").read_text() == "checkpoint"
    assert sorted(os.listdir("/")) == before
    assert not list(tmp_path.rglob(f"*{WORK_INFIX}*"))


def test_export_to_an_existing_file_is_one_line_before_torch_is_even_imported(run, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"mine")
    code = ("import sys; from mmcl.cli import main; "
            f"rc = main(['export', '--run', {str(run)!r}, '--out', {str(tmp_path / 'weights.bin')!r}, '--overwrite']); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr == f"mmcl: error: --out {tmp_path / 'weights.bin'} is an existing file; choose a folder path for the output.\n"
    assert (tmp_path / "weights.bin").read_bytes() == b"mine"


def test_convert_refuses_its_weights_config_and_local_dir_sources_and_the_folders_above(tmp_path, capsys):
    source = tmp_path / "openclip"
    source.mkdir()
    (source / "open_clip_model.safetensors").write_bytes(b"weights")
    (source / "tiny.json").write_text("{}")
    named = ["convert", "openclip", "--model", "ViT-B-32", "--weights", str(source / "open_clip_model.safetensors"),
             "--config", str(source / "tiny.json"), "--overwrite", "--out"]
    assert "is a folder above the source" in refusal([*named, str(source)], capsys)
    assert "is the source" in refusal([*named, str(source / "tiny.json")], capsys)
    local = ["convert", "openclip", "--model", f"local-dir:{source}", "--overwrite", "--out"]
    assert "is the source" in refusal([*local, str(source)], capsys)
    assert "is inside the source" in refusal([*local, str(source / "hf")], capsys)
    assert "is a folder above the source" in refusal([*local, str(tmp_path)], capsys)
    assert sorted(p.name for p in source.iterdir()) == ["open_clip_model.safetensors", "tiny.json"]
    assert (source / "open_clip_model.safetensors").read_bytes() == b"weights"


def test_convert_names_a_missing_or_folder_weights_or_config_before_any_work(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    (tmp_path / "cfg.json").write_text("{}")
    base = ["convert", "openclip", "--model", "ViT-B-32", "--out", str(tmp_path / "out")]
    assert refusal([*base, "--weights", str(tmp_path / "weights")], capsys) == \
        f"mmcl: error: --weights {tmp_path / 'weights'} is a folder; pass the file itself."
    assert refusal([*base, "--weights", str(tmp_path / "w.pt"), "--config", str(tmp_path / "cfg.json")], capsys) == \
        f"mmcl: error: --weights {tmp_path / 'w.pt'} does not exist; pass the file itself."
    assert "names no folder" in refusal(["convert", "openclip", "--model", f"local-dir:{tmp_path / 'none'}",
                                         "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_an_out_whose_parent_cannot_be_written_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code = ("from mmcl.export.staging import check_out\n"
            f"try: check_out({str(locked / 'sub' / 'export')!r}, overwrite=True)\n"
            "except Exception as error: print(type(error).__name__, error)")
    # root may write anywhere: check with the real uid of nobody (os.access asks for the real uid)
    drop = (lambda: os.setreuid(65534, 0)) if os.getuid() == 0 else None
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            preexec_fn=drop, env={**os.environ, "HOME": str(tmp_path)})
    assert result.stdout == (f"ExportError --out {locked / 'sub' / 'export'} cannot be created: {locked} is not writable; "
                             "choose a folder you can write to.\n"), result.stderr
    assert list(locked.iterdir()) == []


def test_overwrite_replaces_an_earlier_export_and_leaves_no_work_folder(run, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "exports" / "model"
    assert mmcl_main(["export", "--run", str(run), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from the earlier export")  # the whole earlier export goes, not file by file
    capsys.readouterr()
    without = refusal(["export", "--run", str(run), "--out", str(out)], capsys)
    assert "already exists and is not empty; choose a new --out or pass --overwrite" in without

    config = run_config(tokenizer_dir)
    model, tokenizer = build(config, seed=1)
    other = write_run(tmp_path / "other_run", config, model, tokenizer)
    assert mmcl_main(["export", "--run", str(other), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert not list(out.parent.glob(f".*{WORK_INFIX}*"))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_exported(out).encode_image(pixels) - model.encode_image(pixels)).abs().max() < 1e-5  # the second run's


def test_an_export_into_its_own_run_folder_is_allowed_as_push_to_hub_does(run):
    out = export_run(run, run / "hf_export", overwrite=True)
    assert (out / "mmcl_export.json").is_file()
    assert export_run(run, run / "hf_export", overwrite=True) == out  # and replaced by the next one
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "hf_export", "metrics.json", "model"]


# ----------------------------------------------------------------------------- kills during the replace

STEPS = {  # where the subprocess is killed -> which output `out` holds once the next run recovered
    "written": "old",  # the new output is written, not yet marked complete
    "complete": "old",  # marked complete, the old one not yet moved aside
    "aside": "new",  # the old one moved aside, the new one not yet in: `out` is missing until recovery
    "swapped": "new",  # the new one in, the old one not yet deleted
    "deleted old": "new",  # killed while deleting the work folder
}
REPLACE = """
import json, sys
from pathlib import Path
from mmcl.export.staging import check_out, staged
out = check_out(sys.argv[1], overwrite=True)
with staged(out) as folder:
    for i in range(50):
        (folder / f"shard{i}.bin").write_bytes(b"new" * 1000)
    (folder / "mmcl_export.json").write_text(json.dumps({"version": "new"}))
"""


def fake_export(folder: Path, version: str) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    for i in range(50):
        (folder / f"shard{i}.bin").write_bytes(version.encode() * 1000)
    (folder / "mmcl_export.json").write_text(json.dumps({"version": version}))
    return export_files(folder)


@pytest.mark.parametrize("step", list(STEPS))
def test_a_kill_at_any_step_of_the_replace_leaves_the_old_or_the_new_output_whole(step, tmp_path):
    out = tmp_path / "export"
    old = fake_export(out, "old")
    new = fake_export(tmp_path / "reference_new", "new")
    result = subprocess.run([sys.executable, "-c", REPLACE, str(out)], cwd=REPO, capture_output=True, timeout=120,
                            env={**os.environ, "MMCL_TEST_KILL_AT": step})
    assert result.returncode == -9, result.stderr  # SIGKILL: no cleanup ran

    [work] = tmp_path.glob(f".export{WORK_INFIX}*")
    if step == "aside":  # between the two renames both outputs lie whole in the work folder
        assert not out.exists()
        assert export_files(work / "old") == old and export_files(work / "new") == new
    else:
        assert export_files(out) in (old, new)
    assert (work / WORK_MARKER).is_file()  # recognisable as mmcl's at every step

    assert check_out(out, overwrite=True) == out  # the next run recovers first
    assert export_files(out) == {"old": old, "new": new}[STEPS[step]]
    assert not list(tmp_path.glob(f".export{WORK_INFIX}*"))


def test_a_killed_real_export_between_the_renames_is_recovered_by_the_next_export(run, tmp_path, tokenizer_dir):
    out = tmp_path / "export"
    export_run(run, out)
    config = run_config(tokenizer_dir)
    model, tokenizer = build(config, seed=1)
    other = write_run(tmp_path / "other_run", config, model, tokenizer)
    command = [sys.executable, "-m", "mmcl.cli", "export", "--run", str(other), "--out", str(out), "--overwrite"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MMCL_TEST_KILL_AT": "aside"})
    assert result.returncode == -9, result.stderr
    assert not out.exists()
    [work] = tmp_path.glob(f".export{WORK_INFIX}*")
    assert load_exported(work / "old") and load_exported(work / "new")  # both whole

    assert recover(out) == [f"restored the new output from {work.name}", f"removed {work.name}"]
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_exported(out).encode_image(pixels) - model.encode_image(pixels)).abs().max() < 1e-5


def test_recovery_leaves_a_look_alike_folder_without_mmcls_marker_and_refuses_a_live_replace(tmp_path):
    out = tmp_path / "export"
    fake_export(out, "old")
    foreign = tmp_path / f".export{WORK_INFIX}notmine"
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    empty = tmp_path / f".export{WORK_INFIX}empty"  # killed before its marker was written
    empty.mkdir()
    assert recover(out) == [f"removed the empty {empty.name}"]
    assert (foreign / "data.txt").read_text() == "mine"

    live = tmp_path / f".export{WORK_INFIX}live"
    live.mkdir()
    (live / WORK_MARKER).write_text(json.dumps({"out": "export", "host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(ExportError, match="another mmcl process is writing"):
        check_out(out, overwrite=True)
    assert (live / WORK_MARKER).is_file() and (out / "mmcl_export.json").is_file()
