"""`mmcl curate write`: new shards hold exactly the selected (and drawn) samples, bytes unchanged, with sizes.json,
and mmcl's training loader reads them."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mmcl.cli import main as mmcl
from mmcl.curate.select_io import write_selection
from mmcl.data.shards import derive_seed, read_shard_sizes


@pytest.fixture
def source(tmp_path, kit):
    """3 shards x 6 samples (real JPEGs, captions, json); returns (pattern, {key: {member name: bytes}})."""
    root = tmp_path / "shards"
    root.mkdir()
    members = {}
    for s in range(3):
        samples = []
        for i in range(6):
            key = f"{s:03d}{i:04d}"
            files = {"jpg": kit.image_bytes(s * 100 + i), "txt": f"a photo of the cat number {s * 6 + i}".encode(),
                     "json": json.dumps({"key": key}).encode()}
            samples.append((key, files))
            members[key] = {f"{key}.{ext}": data for ext, data in files.items()}
        kit.write_shard(root / f"{s:05d}.tar", samples)
    return str(root / "{00000..00002}.tar"), members


def selection(path: Path, probabilities: dict[str, float]) -> Path:
    keys = list(probabilities)
    return write_selection(path, {"key": keys, "probability": [probabilities[k] for k in keys],
                                  "shard": ["x"] * len(keys), "index": list(range(len(keys)))}, {"rules": []})


def drawn_here(seed: int, epoch: int, key: str, p: float) -> bool:
    return p >= 1 or derive_seed(seed, "selection", epoch, key) / 2**64 < p


def written(out: Path, kit) -> dict[str, bytes]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        found.update(kit.tar_members(shard))
    return found


def test_written_shards_hold_the_selected_samples_with_identical_bytes(source, tmp_path, kit, capsys):
    pattern, members = source
    chosen = {"0000001": 1.0, "0000004": 1.0, "0010000": 1.0, "0010005": 1.0, "0020003": 1.0}
    sel = selection(tmp_path / "sel.parquet", chosen)
    out = tmp_path / "out"
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(out),
                 "--samples-per-shard", "2"]) == 0
    expected = {name: data for key in chosen for name, data in members[key].items()}
    assert written(out, kit) == expected
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "mmcl_curate.json", "sizes.json"]
    marker = json.loads((out / "mmcl_curate.json").read_text())
    assert (marker["command"], marker["selected"], marker["written"], marker["skips"]) == ("write", 5, 5, {})
    assert "wrote 5 samples" in capsys.readouterr().out


def test_balanced_samples_are_written_as_the_loader_draws_them(source, tmp_path, kit):
    pattern, members = source
    probabilities = {key: (1.0 if int(key[-1]) % 3 == 0 else 0.5) for key in members}
    sel = selection(tmp_path / "sel.parquet", probabilities)
    keys_by_epoch = []
    for epoch in (0, 1, 1):
        out = tmp_path / f"out{len(keys_by_epoch)}"
        assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(out),
                     "--epoch", str(epoch), "--seed", "7"]) == 0
        keys = {name.split(".")[0] for name in written(out, kit)}
        assert keys == {k for k, p in probabilities.items() if drawn_here(7, epoch, k, p)}
        keys_by_epoch.append(keys)
    assert keys_by_epoch[0] != keys_by_epoch[1] and keys_by_epoch[1] == keys_by_epoch[2]  # rotates; same on a rerun
    assert {k for k, p in probabilities.items() if p == 1.0} <= keys_by_epoch[0] & keys_by_epoch[1]


def test_written_shards_load_with_the_training_loader(source, tmp_path, tokenizer):
    from mmcl.config import DataConfig
    from mmcl.data.loader import build_train_loader

    pattern, members = source
    chosen = {key: 1.0 for key in list(members)[::2]}
    sel = selection(tmp_path / "sel.parquet", chosen)
    out = tmp_path / "out"
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(out),
                 "--samples-per-shard", "4"]) == 0
    cfg = DataConfig(train_shards=str(out / "{00000..00002}.tar"), shuffle_buffer=4, num_workers=0, image_size=16)
    loader = build_train_loader(cfg, tokenizer, 16, batch_size=2, seed=0, rank=0, world_size=1, exhaust=True)
    keys = [key for batch in loader for key in batch["keys"]]
    assert sorted(keys) == sorted(chosen)
    assert not any(loader.skip_counts().values())
    assert read_shard_sizes(sorted(str(p) for p in out.glob("*.tar"))) == [4, 4, 1]
    training = build_train_loader(cfg, tokenizer, 16, batch_size=2, seed=0, rank=0, world_size=1)
    assert training.steps_per_epoch == 4  # epoch mode knows the size from sizes.json: 9 // 2


def test_missing_shards_and_keys_are_counted_not_fatal(source, tmp_path, kit, capsys):
    pattern, members = source
    root = Path(pattern).parent
    chosen = {"0000002": 1.0, "0020001": 1.0, "9990000": 1.0}
    sel = selection(tmp_path / "sel.parquet", chosen)
    out = tmp_path / "out"
    broken = kit.write_shard(root / "00003.tar", [(f"003{i:04d}", {"txt": b"x" * 600}) for i in range(3)])
    with tarfile.open(broken) as tar:
        cut = tar.getmembers()[-1].offset_data + 10
    broken.write_bytes(broken.read_bytes()[:cut])  # ends inside its last member
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", str(root / "{00000..00004}.tar"),
                 "--out", str(out)]) == 0
    assert {name.split(".")[0] for name in written(out, kit)} == {"0000002", "0020001"}
    marker = json.loads((out / "mmcl_curate.json").read_text())
    assert marker["skips"] == {"not_found": 1, "truncated_shard": 1, "unreadable_shard": 1}
    assert "not_found 1" in capsys.readouterr().out


def test_out_refuses_foreign_folders_and_replaces_only_its_own(source, tmp_path, kit, capsys):
    pattern, members = source
    sel = selection(tmp_path / "sel.parquet", {key: 1.0 for key in members})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(foreign), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(out),
                 "--samples-per-shard", "5"]) == 0  # 18 samples: 4 shards
    (out / "keep.txt").write_text("user file")
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    small = selection(tmp_path / "small.parquet", {"0000000": 1.0})
    assert mmcl(["curate", "write", "--selection", str(small), "--shards", pattern, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "keep.txt", "mmcl_curate.json", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 1}


@pytest.mark.parametrize("argv, message", [
    (["--selection", "{tmp}/none.parquet"], "selection file {tmp}/none.parquet does not exist"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
    (["--shards", "{tmp}/nowhere/{{00000..00001}}.tar"], "no shard files match"),
])
def test_bad_arguments_are_one_line_errors(source, tmp_path, capsys, argv, message):
    pattern, members = source
    sel = selection(tmp_path / "sel.parquet", {key: 1.0 for key in members})
    args = {"--selection": str(sel), "--shards": pattern, "--out": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.format(tmp=tmp_path)
    code = mmcl(["curate", "write", *[x for pair in args.items() for x in pair]])
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_selection_nothing_of_which_is_in_the_shards_is_an_error(source, tmp_path, capsys):
    pattern, _ = source
    sel = selection(tmp_path / "sel.parquet", {"elsewhere": 1.0})
    assert mmcl(["curate", "write", "--selection", str(sel), "--shards", pattern, "--out", str(tmp_path / "out")]) == 2
    assert "no selected sample was found" in capsys.readouterr().err


def test_drawn_matches_the_documented_rule():
    from mmcl.curate.write import drawn

    keys = [f"k{i}" for i in range(200)]
    assert [drawn(3, 2, k, 0.3) for k in keys] == [drawn_here(3, 2, k, 0.3) for k in keys]
    assert 40 < sum(drawn(3, 2, k, 0.3) for k in keys) < 80
    assert all(drawn(3, 2, k, 1.0) for k in keys) and not any(drawn(3, 2, k, 0.0) for k in keys)
    assert drawn(np.int64(3), np.int64(2), "k1", 0.3) == drawn(3, 2, "k1", 0.3)  # numpy ints hash as ints
