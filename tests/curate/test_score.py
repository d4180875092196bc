"""`mmcl curate score` in one process: the parts' columns and types, scores and embeddings equal to the
model's own encodings computed independently, bad samples skipped and counted per part, resume of a
folder with missing parts, and every user error as one sentence with exit status 2."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from curate_helpers import MEAN, STD, clip_folder, write_shards
from mmcl.cli import main


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clip_dir):
    root = tmp_path_factory.mktemp("score")
    pattern, good = write_shards(root / "shards", 3, 10, bad=True)
    out = root / "scores"
    assert main(["curate", "score", "--model", str(clip_dir), "--shards", pattern, "--out", str(out),
                 "--batch-size", "4", "--workers", "2"]) == 0
    return pattern, good, out


def features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as pooler_output of a model output."""
    return output if torch.is_tensor(output) else output.pooler_output


def table(out) -> pa.Table:
    return ds.dataset(sorted(str(p) for p in (out / "parts").glob("*.parquet")), format="parquet").to_table()


def test_parts_hold_the_documented_columns_one_file_per_shard_and_the_manifest(scored, clip_dir):
    pattern, good, out = scored
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000-00000.parquet", "00001-00001.parquet",
                                                                 "00002-00002.parquet"]
    schema = pq.read_schema(out / "parts" / "00001-00001.parquet")
    assert [(f.name, f.type) for f in schema] == [
        ("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()), ("caption", pa.string()),
        ("score", pa.float32()), ("image_embedding", pa.list_(pa.float16(), 12)),
        ("text_embedding", pa.list_(pa.float16(), 12))]
    manifest = json.loads((out / "mmcl_curate.json").read_text())
    shards = [str(out.parent / "shards" / f"{i:05d}.tar") for i in range(3)]
    assert manifest["command"] == "score" and manifest["version"] == 1 and manifest["embedding_dim"] == 12
    assert manifest["shards"] == shards and manifest["model"] == str(clip_dir)
    assert len(manifest["model_sha256"]) == 64
    assert manifest["transform"]["image_size"] == 16 and manifest["transform"]["mean"] == list(MEAN)
    rows = table(out)
    assert rows.column("key").to_pylist() == good  # every good sample once, in shard order
    assert rows.column("shard").to_pylist() == [shards[int(k[:3])] for k in good]
    assert rows.column("index").to_pylist() == [int(k[3:]) for k in good]


def test_scores_and_embeddings_are_the_models_own_encodings_of_the_first_caption_and_centre_crop(scored, clip_dir):
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F
    from transformers import AutoTokenizer, CLIPModel

    import tarfile
    pattern, good, out = scored
    rows = table(out).to_pydict()
    model, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    members = {}
    for shard in sorted((out.parent / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    images, captions = [], []
    for key in rows["key"]:
        pixels = decode_jpeg(torch.frombuffer(bytearray(members[f"{key}.jpg"]), dtype=torch.uint8))
        pixels = F.center_crop(F.resize(pixels, [16], interpolation=F.InterpolationMode.BICUBIC, antialias=True), [16, 16])
        images.append((pixels.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
        captions.append(members[f"{key}.txt"].decode())
    assert rows["caption"] == captions
    tokens = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = torch.nn.functional.normalize(features(model.get_image_features(pixel_values=torch.stack(images))), dim=-1)
        text = torch.nn.functional.normalize(features(model.get_text_features(**tokens)), dim=-1)
    np.testing.assert_allclose(np.array(rows["score"]), (image * text).sum(-1).numpy(), atol=2e-6)
    for column, expected in (("image_embedding", image), ("text_embedding", text)):
        stored = np.array(rows[column], dtype=np.float16)
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored, expected.numpy().astype(np.float16))


def test_bad_samples_are_skipped_and_counted_in_their_parts_metadata(scored):
    _, _, out = scored
    metadata = {p.name: json.loads(pq.read_schema(p).metadata[b"mmcl"]) for p in (out / "parts").glob("*.parquet")}
    assert metadata == {"00000-00000.parquet": {"skips": {"corrupt_image": 1, "empty_caption": 1}, "samples": 10},
                        "00001-00001.parquet": {"skips": {}, "samples": 10},
                        "00002-00002.parquet": {"skips": {}, "samples": 10}}
    first = pq.read_table(out / "parts" / "00000-00000.parquet").column("index").to_pylist()
    assert first == [0, 1, 3, 4, 6, 7, 8, 9]


def test_a_rerun_keeps_the_finished_parts_and_redoes_only_the_missing_ones(scored, clip_dir, tmp_path, capsys):
    pattern, _, out = scored
    copy = tmp_path / "scores"
    import shutil

    shutil.copytree(out, copy)
    (copy / "parts" / "00001-00001.parquet").unlink()
    (copy / "parts" / "00002-00002.parquet.tmp-123").write_bytes(b"half a part")  # a killed writer's leftover
    kept = (copy / "parts" / "00000-00000.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["curate", "score", "--model", str(clip_dir), "--shards", pattern, "--out", str(copy),
                 "--batch-size", "4", "--workers", "0"]) == 0
    assert "3 shards: 2 parts already written, 1 to do" in capsys.readouterr().out
    assert (copy / "parts" / "00000-00000.parquet").stat().st_mtime_ns == kept
    assert sorted(p.name for p in (copy / "parts").iterdir()) == sorted(p.name for p in (out / "parts").iterdir())
    assert table(copy).equals(table(out))  # in-process reading (--workers 0), the same rows bit for bit


def error_of(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: "), captured.err
    return lines[0]


def test_user_errors_are_one_sentence_with_status_2_and_write_nothing(scored, clip_dir, tmp_path, capsys):
    pattern, _, out = scored
    base = ["curate", "score", "--model", str(clip_dir), "--shards", pattern]
    assert "--model" in error_of(capsys, ["curate", "score", "--model", str(tmp_path / "nope"), "--shards", pattern,
                                          "--out", str(tmp_path / "a")])
    assert "no shard files match" in error_of(capsys, [*base[:4], "--shards", str(tmp_path / "none-{0..3}.tar"),
                                                       "--out", str(tmp_path / "b")])
    (tmp_path / "file").write_text("x")
    assert "is a file" in error_of(capsys, [*base, "--out", str(tmp_path / "file")])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert "did not write" in error_of(capsys, [*base, "--out", str(tmp_path / "foreign")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]


def test_a_folder_of_another_model_is_refused_and_replaced_only_with_overwrite(scored, tmp_path, capsys):
    import shutil

    pattern, _, out = scored
    other = clip_folder(tmp_path / "other", seed=4)
    copy = tmp_path / "scores"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in (copy / "parts").iterdir()}
    argv = ["curate", "score", "--model", str(other), "--shards", pattern, "--out", str(copy), "--workers", "0"]
    assert "another model, shard list or settings (its model_sha256 differs)" in error_of(capsys, argv)
    assert {p.name: p.read_bytes() for p in (copy / "parts").iterdir()} == before
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((copy / "mmcl_curate.json").read_text())["model"] == str(other)
    assert not table(copy).column("score").equals(table(out).column("score"))
