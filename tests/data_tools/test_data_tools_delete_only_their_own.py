"""The data tools delete only what they wrote: a foreign folder or another tool's shards are refused, never emptied."""

from __future__ import annotations

import json
import tarfile

import pytest

from data_tools.demo_dataset import BUILDING, build_demo
from data_tools.errors import DataToolsError
from data_tools.samples import SourceItem
from data_tools.write_shards import write_shards


def _items(image_bytes, n: int) -> list[SourceItem]:
    return [SourceItem(source=f"img{i}.jpg", image=image_bytes("JPEG", (10, 8), (20 * i, 0, 0)), captions=(f"caption {i}",))
            for i in range(n)]


def test_demo_data_refuses_a_folder_with_its_names_it_did_not_write_even_with_force(tmp_path):
    (tmp_path / "README.md").write_text("my project")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(DataToolsError, match=r"already holds train, README.md, which mmcl-demo-data did not write"):
        build_demo(tmp_path, force=True)
    assert (tmp_path / "README.md").read_text() == "my project"
    assert (tmp_path / "train" / "photo.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "train"]


def test_demo_data_replaces_a_stopped_build_it_recognises_by_its_marker(tmp_path):
    (tmp_path / BUILDING).write_text("")  # a build killed before info.json
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "00000.tar").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")  # not one of its names: stays
    info = build_demo(tmp_path, image_size=8, samples_per_shard=2000)
    assert info["splits"]["train"]["shards"] == 1 and tarfile.is_tarfile(tmp_path / "train" / "00000.tar")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / BUILDING).exists()


def test_overwrite_of_shards_refuses_another_tools_shards_and_spares_files_a_stats_json_names(tmp_path, image_bytes):
    other = tmp_path / "img2dataset"
    other.mkdir()
    (other / "00000.tar").write_bytes(b"their shard")
    (other / "00000_stats.json").write_text("{}")
    with pytest.raises(DataToolsError, match="already holds shards that mmcl-write-shards did not write"):
        write_shards(_items(image_bytes, 2), other, overwrite=True)
    assert (other / "00000.tar").read_bytes() == b"their shard"

    ours = tmp_path / "ours"
    write_shards(_items(image_bytes, 2), ours, samples_per_shard=1)
    (ours / "notes.txt").write_text("mine")
    stats = json.loads((ours / "stats.json").read_text())
    stats["sizes"]["notes.txt"] = 0  # a stats.json naming a file that is not a shard
    (ours / "stats.json").write_text(json.dumps(stats))
    write_shards(_items(image_bytes, 1), ours, overwrite=True)
    assert sorted(p.name for p in ours.iterdir()) == ["00000.tar", "00000_stats.json", "notes.txt", "sizes.json", "stats.json"]


def test_overwrite_of_shards_replaces_a_stopped_write_it_recognises_by_its_marker(tmp_path, image_bytes):
    with pytest.raises(RuntimeError):
        def failing():
            yield from _items(image_bytes, 3)
            raise RuntimeError("stopped")
        write_shards(failing(), tmp_path, samples_per_shard=1)
    assert (tmp_path / "00001.tar").is_file() and not (tmp_path / "stats.json").exists()
    with pytest.raises(DataToolsError, match="already holds shards; pass --overwrite"):
        write_shards(_items(image_bytes, 1), tmp_path)
    write_shards(_items(image_bytes, 1), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json", "sizes.json", "stats.json"]
