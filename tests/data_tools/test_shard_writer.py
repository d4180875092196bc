"""The shard writer: img2dataset layout, shard splitting, determinism, failures, resizing, CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from data_tools.errors import DataToolsError
from data_tools.samples import ImageOptions, SourceItem
from data_tools.sources import table_source
from data_tools.write_shards import main, parse_size, write_shards


def _items(image_bytes, n: int, labels: bool = True) -> list[SourceItem]:
    return [
        SourceItem(
            source=f"img{i}.jpg",
            image=image_bytes("JPEG", (10 + i, 8), (20 * i, 0, 0)),
            captions=(f"caption {i}",) if i != 1 else ("first of two", "second of two"),
            label=i % 3 if labels else None,
        )
        for i in range(n)
    ]


def test_layout_has_nine_digit_keys_json_cls_and_stats(tmp_path, image_bytes, tar_members, read_member):
    stats = write_shards(_items(image_bytes, 5), tmp_path, samples_per_shard=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "00002.tar",
        "00002_stats.json",
        "sizes.json",
        "stats.json",
    ]
    assert tar_members(tmp_path / "00000.tar") == [
        "000000000.jpg",
        "000000000.txt",
        "000000000.json",
        "000000000.cls",
        "000000001.jpg",
        "000000001.txt",
        "000000001.json",
        "000000001.cls",
    ]
    assert tar_members(tmp_path / "00002.tar") == ["000020000.jpg", "000020000.txt", "000020000.json", "000020000.cls"]
    meta = json.loads(read_member(tmp_path / "00000.tar", "000000000.json"))
    assert meta == {
        "key": "000000000",
        "caption": "caption 0",
        "source": "img0.jpg",
        "label": 0,
        "width": 10,
        "height": 8,
        "original_width": 10,
        "original_height": 8,
    }
    # Several captions: .txt is a JSON list, the json has all of them and the first as `caption`.
    assert json.loads(read_member(tmp_path / "00000.tar", "000000001.txt")) == ["first of two", "second of two"]
    assert json.loads(read_member(tmp_path / "00000.tar", "000000001.json"))["captions"] == [
        "first of two",
        "second of two",
    ]
    assert read_member(tmp_path / "00001.tar", "000010000.cls") == b"2"
    # Kept as given: no re-encoding without resizing.
    assert read_member(tmp_path / "00001.tar", "000010001.jpg") == _items(image_bytes, 5)[3].image

    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    shard_stats = json.loads((tmp_path / "00001_stats.json").read_text())
    assert (shard_stats["count"], shard_stats["successes"], shard_stats["failed"]) == (2, 2, 0)
    assert shard_stats["bytes"] == (tmp_path / "00001.tar").stat().st_size
    assert json.loads((tmp_path / "stats.json").read_text())["successes"] == 5
    assert (stats.count, stats.successes, len(stats.shards)) == (5, 5, 3)


def test_more_than_ten_thousand_per_shard_widens_the_index(tmp_path, image_bytes, tar_members):
    write_shards(_items(image_bytes, 1), tmp_path, samples_per_shard=20_000)
    assert tar_members(tmp_path / "00000.tar")[0] == "0000000000.jpg"  # 5 + 5 digits


def test_max_shard_bytes_starts_new_shards(tmp_path, image_bytes):
    items = [
        SourceItem(source=f"{i}", image=image_bytes("PNG", (40, 40), (i, i, i), noise=True), captions=("x",))
        for i in range(9)
    ]
    assert len(items[0].image) > 4000
    limit = 3 * 10240
    stats = write_shards(items, tmp_path, max_shard_bytes=limit)

    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sum(sizes.values()) == 9 and len(sizes) >= 3
    for name in sizes:
        assert (tmp_path / name).stat().st_size <= limit
    assert [s.successes for s in stats.shards] == list(sizes.values())


@pytest.mark.slow
def test_writing_twice_gives_identical_bytes_with_any_worker_count(tmp_path, image_bytes, dir_digest):
    items = _items(image_bytes, 7)
    options = ImageOptions(resize_mode="center_crop", image_size=6)
    write_shards(items, tmp_path / "a", samples_per_shard=3, image_options=options)
    write_shards(items, tmp_path / "b", samples_per_shard=3, image_options=options)
    write_shards(items, tmp_path / "c", samples_per_shard=3, image_options=options, workers=2)
    first = dir_digest(tmp_path / "a")
    assert len(first) == 3 + 3 + 2
    assert first == dir_digest(tmp_path / "b") == dir_digest(tmp_path / "c")


@pytest.mark.parametrize(
    "mode, size, expected",
    [("shorter", 10, (20, 10)), ("center_crop", 10, (10, 10)), ("shorter", 40, (80, 40))],
)
def test_resize_modes_set_size_and_keep_original_size_in_json(tmp_path, image_bytes, read_member, mode, size, expected):
    item = SourceItem(source="wide.png", image=image_bytes("PNG", (40, 20)), captions=("wide",))
    write_shards([item], tmp_path, image_options=ImageOptions(resize_mode=mode, image_size=size))
    meta = json.loads(read_member(tmp_path / "00000.tar", "000000000.json"))
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (*expected, 40, 20)
    png = read_member(tmp_path / "00000.tar", "000000000.png")  # resized PNG stays PNG under "keep"
    assert Image.open(io.BytesIO(png)).size == expected


def test_output_format_reencodes_on_request(tmp_path, image_bytes, tar_members, read_member):
    item = SourceItem(source="a.png", image=image_bytes("PNG"), captions=("a",))
    write_shards([item], tmp_path, image_options=ImageOptions(output_format="webp", quality=80))
    assert tar_members(tmp_path / "00000.tar")[0] == "000000000.webp"
    assert Image.open(io.BytesIO(read_member(tmp_path / "00000.tar", "000000000.webp"))).format == "WEBP"


def test_unreadable_inputs_are_listed_with_reasons_and_the_rest_written(tmp_path, image_bytes):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good1.jpg").write_bytes(image_bytes())
    (images / "good2.png").write_bytes(image_bytes("PNG"))
    (images / "corrupt.jpg").write_bytes(image_bytes()[:40])
    (images / "empty_caption.jpg").write_bytes(image_bytes())
    rows = [
        ("good1.jpg", "one"),
        ("corrupt.jpg", "broken"),
        ("missing.jpg", "gone"),
        ("empty_caption.jpg", "  "),
        ("good2.png", "two"),
    ]
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *rows])

    stats = write_shards(table_source(images, table), tmp_path / "out")

    assert stats.successes == 2
    assert [(f.source, f.reason) for f in stats.failures] == [
        ("corrupt.jpg", "corrupt_image"),
        ("missing.jpg", "missing_file"),
        ("empty_caption.jpg", "empty_caption"),
    ]
    saved = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert (saved["count"], saved["successes"], saved["failed"]) == (5, 2, 3)
    assert saved["failure_reasons"] == {"corrupt_image": 1, "empty_caption": 1, "missing_file": 1}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 2}


def test_existing_shards_are_refused_then_replaced_with_overwrite(tmp_path, image_bytes):
    write_shards(_items(image_bytes, 4), tmp_path, samples_per_shard=1)
    with pytest.raises(DataToolsError, match="already holds shards; pass --overwrite"):
        write_shards(_items(image_bytes, 1), tmp_path)
    write_shards(_items(image_bytes, 1), tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json", "sizes.json", "stats.json"]


def test_cli_writes_a_table_and_names_missing_columns(tmp_path, image_bytes, capsys):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file": "a.jpg", "text": "a red block", "y": 4}) + "\n")

    with pytest.raises(SystemExit) as failed:
        main(["table", "--images", str(tmp_path), "--table", str(table), "--out", str(tmp_path / "o"), "--no-progress"])
    assert "has no column 'image' (available: file, text, y); set --image-column" in str(failed.value.code)

    argv = [
        "table",
        "--images",
        str(tmp_path),
        "--table",
        str(table),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--image-column",
        "file",
        "--caption-column",
        "text",
        "--label-column",
        "y",
        "--max-shard-bytes",
        "1M",
    ]
    assert main(argv) == 0
    assert "wrote 1 samples in 1 shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "sizes.json").read_text()) == {"00000.tar": 1}


def test_cli_rejects_inconsistent_options_in_one_sentence(tmp_path):
    with pytest.raises(SystemExit) as failed:
        main(["imagenet", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--resize-mode", "shorter"])
    assert (
        str(failed.value.code)
        == "mmcl-write-shards: error: resize mode 'shorter' needs a positive image size (--image-size N)."
    )
    with pytest.raises(SystemExit) as failed:
        main(["imagenet", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "does not exist" in str(failed.value.code)


def test_parse_size_understands_units():
    assert [parse_size(t) for t in ("512", "64K", "1.5M", "1G", "2GiB")] == [512, 65536, 1572864, 1 << 30, 2 << 30]


def test_a_caption_that_looks_like_a_json_list_stays_one_caption(tmp_path, image_bytes, read_member):
    from mmcl.data.decode import decode_caption

    write_shards([SourceItem(source="x", image=image_bytes(), captions=("[1, 2]",))], tmp_path)
    assert decode_caption(read_member(tmp_path / "00000.tar", "000000000.txt")) == "[1, 2]"
