"""The shard inspector: counts, bad samples, truncated and unreadable shards, exit status."""

from __future__ import annotations

import json
import tarfile

import pytest

from data_tools.inspect_shards import inspect_shards, main
from data_tools.samples import SourceItem
from data_tools.shard_reader import expand_urls
from data_tools.write_shards import write_shards


@pytest.fixture
def good_set(tmp_path, image_bytes):
    items = [
        SourceItem(source=str(i), image=image_bytes(color=(i, 0, 0)), captions=(f"c{i}",), label=i) for i in range(7)
    ]
    write_shards(items, tmp_path / "good", samples_per_shard=3)
    return tmp_path / "good"


@pytest.mark.slow
def test_counts_every_sample_of_good_shards(good_set, capsys):
    report = inspect_shards(f"{good_set}/{{00000..00002}}.tar")
    assert [(s.samples, s.good, s.status, s.expected) for s in report.shards] == [
        (3, 3, "ok", 3),
        (3, 3, "ok", 3),
        (1, 1, "ok", 1),
    ]
    assert (report.samples, report.good, report.ok) == (7, 7, True)

    assert main([str(good_set), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK: 3 shards, 0 damaged, 7 good samples of 7" in out


def test_reports_corrupt_image_and_missing_caption(tmp_path, image_bytes, make_tar, capsys):
    shard = make_tar(
        tmp_path / "mixed.tar",
        [
            ("000000000.jpg", image_bytes()),
            ("000000000.txt", b"fine"),
            ("000000001.jpg", image_bytes()[:50]),
            ("000000001.txt", b"broken image"),
            ("000000002.png", image_bytes("PNG")),  # no caption
            ("000000003.txt", b"no image"),
            ("000000003.cls", b"seven"),
        ],
    )
    report = inspect_shards(str(shard))
    assert (report.samples, report.good) == (4, 1)
    assert dict(report.problems) == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1, "bad_label": 1}
    assert [s["key"] for s in report.shards[0].bad_samples] == ["000000001", "000000002", "000000003"]
    # Bad samples alone do not fail the set (training skips them) unless --strict.
    assert report.ok
    assert main([str(shard), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["totals"]["bad"] == 3 and printed["shards"][0]["problems"]["corrupt_image"] == 1
    with pytest.raises(SystemExit) as failed:
        main([str(shard), "--strict"])
    assert failed.value.code == 1

    image_only = inspect_shards(str(shard), captions=False)
    assert "missing_caption" not in image_only.problems and image_only.good == 2


def test_truncated_shard_is_reported_and_fails(good_set, tmp_path, capsys):
    data = (good_set / "00000.tar").read_bytes()
    with tarfile.open(good_set / "00000.tar") as tar:
        members = tar.getmembers()
    cut_in_member = tmp_path / "cut_in_member.tar"
    cut_in_member.write_bytes(data[: members[0].offset_data + 100])  # inside the first image's bytes
    cut_between = tmp_path / "cut_between.tar"
    cut_between.write_bytes(data[: members[2].offset])  # jpg + txt of the first sample, then nothing

    report = inspect_shards([str(cut_in_member), str(cut_between)])
    # The training pipeline's own tar reader judges: cut inside the first member, nothing at
    # all could be read ("unreadable"); cut after a whole sample, it is "truncated".
    assert [s.status for s in report.shards] == ["unreadable", "truncated"]
    assert "unreadable_shard" in report.shards[0].error
    assert "end-of-archive" in report.shards[1].error
    assert not report.ok
    with pytest.raises(SystemExit) as failed:
        main([str(good_set / "00001.tar"), str(cut_between)])
    assert failed.value.code == 1
    assert "TRUNCATED" in capsys.readouterr().out


def test_unreadable_set_exits_non_zero(tmp_path, good_set):
    (tmp_path / "notatar.tar").write_bytes(b"hello, not a tar")
    for argv in ([str(tmp_path / "notatar.tar")], [str(tmp_path / "missing.tar"), str(good_set / "00000.tar")]):
        with pytest.raises(SystemExit) as failed:
            main(argv)
        assert failed.value.code == 1
    report = inspect_shards(str(tmp_path / "notatar.tar"))
    assert report.shards[0].status == "unreadable" and "unreadable_shard" in report.shards[0].error
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(SystemExit) as failed:
        main([str(tmp_path / "empty_folder")])
    assert "no shard matches" in str(failed.value.code)


def test_empty_but_valid_set_has_no_readable_samples(tmp_path, make_tar):
    shard = make_tar(tmp_path / "empty.tar", [])
    report = inspect_shards(str(shard))
    assert report.shards[0].status == "ok" and not report.ok


def test_expand_urls_braces_folders_and_double_colon(good_set):
    expected = [str(good_set / f"0000{i}.tar") for i in range(3)]
    assert expand_urls(f"{good_set}/{{00000..00002}}.tar") == expected
    assert expand_urls(str(good_set)) == expected
    assert expand_urls(f"{expected[2]}::{good_set}/0000[01].tar") == [expected[2], *expected[:2]]


def test_malformed_captions_labels_and_metadata_are_counted_not_raised(tmp_path, image_bytes, make_tar, capsys):
    nested = b"[" * 5000 + b"]" * 5000
    shard = make_tar(
        tmp_path / "malformed.tar",
        [
            ("000000000.jpg", image_bytes()),
            ("000000000.txt", b"fine"),
            ("000000001.jpg", image_bytes()),
            ("000000001.txt", nested),
            ("000000002.jpg", image_bytes()),
            ("000000002.txt", b"fine"),
            ("000000002.json", nested),
            ("000000002.cls", b"9" * 5000),
            ("000000003.jpg", image_bytes()),
            ("000000003.txt", b"a cat " * 20_000),  # above the 64 KiB caption limit: not even read
            ("000000004.jpg", image_bytes()),
            ("000000004.txt", b"fine"),
            ("000000004.json", b'{"key": "x"}' + b" " * 70_000),
        ],
    )
    report = inspect_shards(str(shard))
    assert (report.samples, report.good, report.ok) == (5, 1, True)
    assert dict(report.problems) == {"bad_caption": 1, "bad_json": 1, "bad_label": 1, "caption_too_large": 1,
                                     "metadata_too_large": 1}
    assert main([str(shard)]) == 0
    out = capsys.readouterr().out
    assert "bad_caption=1" in out and "caption_too_large=1" in out and "OK: 1 shards, 0 damaged, 1 good samples of 5" in out
