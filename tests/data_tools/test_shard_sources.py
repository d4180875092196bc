"""Each shard-writer source: folder + table (CSV/TSV/JSONL/parquet), `datasets` (saved, imagefolder), ImageNet-style."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest

from data_tools.errors import DataToolsError
from data_tools.hf_source import hf_source
from data_tools.sources import imagenet_source, table_source
from data_tools.write_shards import write_shards

# (image, caption cell, label): b.png has two rows (grouped) and c.jpg a JSON list in one cell.
ROWS = [
    ("a.jpg", "a red square", 0),
    ("b.png", "a green square", 1),
    ("c.jpg", '["a blue square", "blue"]', 2),
    ("b.png", "green again", 1),
]


def _samples(out: Path) -> list[dict]:
    """Every sample of every shard in `out` as {field: text or bytes}, in order."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = data if ext in ("jpg", "png", "webp") else data.decode()
    return list(samples.values())


def _write_table(path: Path, fmt: str) -> None:
    records = [{"image": image, "caption": caption, "label": label} for image, caption, label in ROWS]
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["image", "caption", "label"], delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "jsonl":
        # JSONL can hold a real list instead of a JSON string.
        records[2]["caption"] = ["a blue square", "blue"]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_table_source_groups_rows_and_reads_labels(tmp_path, image_bytes, fmt):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(image_bytes("JPEG", color=(255, 0, 0)))
    (images / "b.png").write_bytes(image_bytes("PNG", color=(0, 255, 0)))
    (images / "c.jpg").write_bytes(image_bytes("JPEG", color=(0, 0, 255)))
    table = tmp_path / f"captions.{fmt}"
    _write_table(table, fmt)

    stats = write_shards(table_source(images, table, label_column="label"), tmp_path / "out")

    assert stats.successes == 3 and not stats.failures
    samples = _samples(tmp_path / "out")
    assert [s["txt"] for s in samples] == [
        "a red square",
        '["a green square", "green again"]',
        '["a blue square", "blue"]',
    ]
    assert [s["cls"] for s in samples] == ["0", "1", "2"]
    assert samples[1]["png"] == (images / "b.png").read_bytes()
    assert [json.loads(s["json"])["source"] for s in samples] == ["a.jpg", "b.png", "c.jpg"]


def test_table_source_errors_are_one_clear_sentence(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,text\nx.jpg,hello\n")
    with pytest.raises(DataToolsError, match=r"image folder .*nope does not exist"):
        table_source(tmp_path / "nope", table)
    with pytest.raises(DataToolsError, match=r"has no column 'image' \(available: path, text\); set --image-column"):
        table_source(tmp_path, table)
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataToolsError, match="unknown extension; use one of .csv"):
        table_source(tmp_path, tmp_path / "t.xlsx")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg"}\nnot json\n')
    with pytest.raises(DataToolsError, match="line 2 of .* is not valid JSON"):
        table_source(tmp_path, bad)


def test_table_source_reports_bad_labels_per_row(tmp_path, image_bytes):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.jpg").write_bytes(image_bytes())
    table = tmp_path / "t.csv"
    table.write_text("image,caption,label\na.jpg,first,3\nb.jpg,second,cat\n")
    stats = write_shards(table_source(tmp_path, table, label_column="label"), tmp_path / "out")
    assert stats.successes == 1
    assert [(f.source, f.reason) for f in stats.failures] == [("b.jpg", "bad_label")]


def test_hf_saved_dataset_with_classlabel_writes_labels_and_classnames(tmp_path, image_bytes):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
        }
    )
    train = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": image_bytes("PNG", color=(i, 0, 0)), "path": None} for i in range(3)],
            "text": ["a cat", "a dog", "another cat"],
            "label": [0, 1, 0],
        },
        features=features,
    )
    datasets.DatasetDict({"train": train, "test": train.select([1])}).save_to_disk(str(tmp_path / "saved"))

    stats = write_shards(hf_source(tmp_path / "saved", split="train", label_column="label"), tmp_path / "out")

    assert stats.successes == 3
    samples = _samples(tmp_path / "out")
    assert [(s["txt"], s["cls"]) for s in samples] == [("a cat", "0"), ("a dog", "1"), ("another cat", "0")]
    assert samples[0]["png"] == image_bytes("PNG", color=(0, 0, 0))  # original bytes, not re-encoded
    assert json.loads(samples[2]["json"])["source"] == "train[2]"
    assert (tmp_path / "out" / "classnames.txt").read_text() == "cat\ndog\n"
    with pytest.raises(DataToolsError, match=r"has no split 'validation' \(splits: train, test\)"):
        hf_source(tmp_path / "saved", split="validation")


def test_hf_imagefolder_data_dir_reads_metadata_captions(tmp_path, image_bytes):
    data = tmp_path / "data"
    data.mkdir()
    for name, color in [("x.jpg", (9, 9, 9)), ("y.jpg", (99, 99, 99))]:
        (data / name).write_bytes(image_bytes("JPEG", color=color))
    (data / "metadata.csv").write_text("file_name,text\nx.jpg,first photo\ny.jpg,second photo\n")

    source = hf_source(data, split="train", cache_dir=tmp_path / "cache")
    stats = write_shards(source, tmp_path / "out")

    assert stats.successes == 2
    samples = sorted(_samples(tmp_path / "out"), key=lambda s: s["txt"])
    assert [s["txt"] for s in samples] == ["first photo", "second photo"]
    assert sorted(json.loads(s["json"])["source"] for s in samples) == ["x.jpg", "y.jpg"]
    assert samples[0]["jpg"] == (data / "x.jpg").read_bytes()
    with pytest.raises(DataToolsError, match=r"has no column 'caption' \(available: image, text\)"):
        hf_source(data, caption_column="caption", cache_dir=tmp_path / "cache")


def test_imagenet_folder_sorted_classes_labels_and_classnames(tmp_path, image_bytes, tar_members):
    root = tmp_path / "imagenet"
    for folder, files in {
        "b_golden_retriever": ["2.jpg", "1.JPEG"],
        "a_tabby_cat": ["z.png"],
        ".hidden": ["h.jpg"],
    }.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(image_bytes("PNG" if name.endswith("png") else "JPEG"))
    (root / "a_tabby_cat" / "notes.txt").write_text("not an image")

    stats = write_shards(imagenet_source(root), tmp_path / "out")

    assert stats.successes == 3
    assert (tmp_path / "out" / "classnames.txt").read_text() == "a tabby cat\nb golden retriever\n"
    samples = _samples(tmp_path / "out")
    assert [(json.loads(s["json"])["source"], s["cls"], s["txt"]) for s in samples] == [
        ("a_tabby_cat/z.png", "0", "a tabby cat"),
        ("b_golden_retriever/1.JPEG", "1", "b golden retriever"),
        ("b_golden_retriever/2.jpg", "1", "b golden retriever"),
    ]
    assert tar_members(tmp_path / "out" / "00000.tar")[:4] == [
        "000000000.png",
        "000000000.txt",
        "000000000.json",
        "000000000.cls",
    ]


def test_imagenet_folder_without_classes_is_a_clear_error(tmp_path):
    with pytest.raises(DataToolsError, match="has no class subfolders"):
        imagenet_source(tmp_path)


def test_hf_missing_local_folder_fails_without_asking_the_hub(tmp_path):
    with pytest.raises(DataToolsError, match=r"dataset folder .*nope/data does not exist"):
        hf_source(tmp_path / "nope" / "data")
