"""`mmcl curate reinforce` with two teachers of different image sizes, dimensions and normalisations:
the store's columns and manifest, crop boxes and flips that follow (seed, key) and repeat on a rerun,
every stored image embedding equal to the teacher's own encoding of that crop (computed here from the
JPEG), text embeddings of the first caption, skips counted, and a resume that redoes only missing parts."""
from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from curate_helpers import clip_folder, write_shards
from mmcl.cli import main

K = 3
SECOND = dict(image_size=24, dim=8, mean=(0.5, 0.5, 0.5), std=(0.3, 0.3, 0.3))


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_dir):
    root = tmp_path_factory.mktemp("reinforce")
    pattern, good = write_shards(root / "shards", 2, 6, bad=True)
    second = clip_folder(root / "second", seed=5, **SECOND)
    argv = ["curate", "reinforce", "--teacher", str(clip_dir), "--teacher", str(second), "--shards", pattern,
            "--augmentations", str(K), "--seed", "7", "--crop-scale", "0.3", "1.0", "--batch-size", "4"]
    assert main([*argv, "--out", str(root / "store"), "--workers", "1"]) == 0
    return root, argv, good, [clip_dir, second]


def table(out) -> pa.Table:
    return ds.dataset(sorted(str(p) for p in (out / "parts").glob("*.parquet")), format="parquet").to_table()


def test_the_store_has_one_column_set_per_teacher_and_the_documented_manifest(store):
    root, _, good, teachers = store
    out = root / "store"
    assert [(f.name, f.type) for f in table(out).schema] == [
        ("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()), ("boxes", pa.list_(pa.float32(), 4 * K)),
        ("flips", pa.list_(pa.bool_(), K)),
        ("image_embedding_0", pa.list_(pa.float16(), K * 12)), ("text_embedding_0", pa.list_(pa.float16(), 12)),
        ("image_embedding_1", pa.list_(pa.float16(), K * 8)), ("text_embedding_1", pa.list_(pa.float16(), 8))]
    manifest = json.loads((out / "mmcl_curate.json").read_text())
    assert {k: manifest[k] for k in ("command", "version", "augmentations", "seed", "crop_scale")} == {
        "command": "reinforce", "version": 1, "augmentations": K, "seed": 7, "crop_scale": [0.3, 1.0]}
    assert manifest["shards"] == [str(root / "shards" / f"{i:05d}.tar") for i in range(2)]
    assert [(t["name"], t["embedding_dim"], t["image_size"]) for t in manifest["teachers"]] == [
        (str(teachers[0]), 12, 16), (str(teachers[1]), 8, 24)]
    assert all(len(t["sha256"]) == 64 and t["logit_scale"] > 0 for t in manifest["teachers"])
    assert table(out).column("key").to_pylist() == good  # the corrupt JPEG and the empty caption are skipped
    skips = json.loads(pa.parquet.read_schema(out / "parts" / "00000-00000.parquet").metadata[b"mmcl"])
    assert skips == {"skips": {"corrupt_image": 1, "empty_caption": 1}, "samples": 6}


def members(root) -> dict[str, bytes]:
    found = {}
    for shard in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


def test_boxes_and_flips_follow_seed_and_key_and_repeat_on_a_rerun(store, tmp_path):
    from PIL import Image
    import io

    import torchvision.transforms as T

    from mmcl.curate.reinforce_store import draw_augmentations
    from mmcl.data.shards import derive_seed

    root, argv, _, _ = store
    rows = table(root / "store").to_pydict()
    files = members(root)
    for key, boxes, flips in zip(rows["key"], rows["boxes"], rows["flips"]):
        width, height = Image.open(io.BytesIO(files[f"{key}.jpg"])).size
        drawn, drawn_flips = draw_augmentations(7, key, K, height, width, (0.3, 1.0))
        expected = [[t / height, l / width, h / height, w / width] for t, l, h, w in drawn]
        np.testing.assert_array_equal(np.array(boxes, dtype=np.float32), np.array(expected, dtype=np.float32).reshape(-1))
        assert flips == drawn_flips
        torch.manual_seed(derive_seed(7, "reinforce", key) % 2 ** 63)  # torchvision's own draws, same seed
        reference = []
        for _ in range(K):
            reference.append((tuple(T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.3, 1.0], [3 / 4, 4 / 3])),
                              bool(torch.rand(()) < 0.5)))
        assert reference == list(zip(drawn, drawn_flips))
    assert any(any(f) for f in rows["flips"]) and not all(all(f) for f in rows["flips"])
    assert main([*argv, "--out", str(tmp_path / "again"), "--workers", "0"]) == 0
    assert table(tmp_path / "again").equals(table(root / "store"))  # the same boxes, flips and embeddings
    other, _ = draw_augmentations(8, rows["key"][0], K, 28, 40, (0.3, 1.0))
    assert other != draw_augmentations(7, rows["key"][0], K, 28, 40, (0.3, 1.0))[0]


def features(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


def test_each_stored_embedding_is_the_teachers_own_encoding_of_that_crop_and_caption(store):
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    root, _, _, teachers = store
    rows = table(root / "store").to_pydict()
    files = members(root)
    for t, folder in enumerate(teachers):
        model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        processor = AutoImageProcessor.from_pretrained(folder)
        size = processor.crop_size["height"]
        mean, std = torch.tensor(processor.image_mean).view(3, 1, 1), torch.tensor(processor.image_std).view(3, 1, 1)
        crops = []
        for key, boxes, flips in zip(rows["key"], rows["boxes"], rows["flips"]):
            image = decode_jpeg(torch.frombuffer(bytearray(files[f"{key}.jpg"]), dtype=torch.uint8))
            height, width = image.shape[-2:]
            for k in range(K):
                top, left, h, w = boxes[4 * k:4 * k + 4]
                crop = F.resized_crop(image, round(top * height), round(left * width), round(h * height),
                                      round(w * width), [size, size], interpolation=F.InterpolationMode.BICUBIC,
                                      antialias=True)
                crop = F.horizontal_flip(crop) if flips[k] else crop
                crops.append((crop.float() / 255 - mean) / std)
        captions = [files[f"{key}.txt"].decode() for key in rows["key"]]
        tokens = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            image = torch.nn.functional.normalize(features(model.get_image_features(pixel_values=torch.stack(crops))), dim=-1)
            text = torch.nn.functional.normalize(features(model.get_text_features(**tokens)), dim=-1)
        np.testing.assert_array_equal(np.array(rows[f"image_embedding_{t}"], dtype=np.float16),
                                      image.reshape(len(rows["key"]), -1).numpy().astype(np.float16))
        np.testing.assert_array_equal(np.array(rows[f"text_embedding_{t}"], dtype=np.float16),
                                      text.numpy().astype(np.float16))


def test_a_rerun_resumes_the_store_and_other_augmentations_are_refused(store, tmp_path, capsys):
    root, argv, _, _ = store
    copy = tmp_path / "store"
    shutil.copytree(root / "store", copy)
    (copy / "parts" / "00001-00001.parquet").unlink()
    capsys.readouterr()
    assert main([*argv, "--out", str(copy), "--workers", "0"]) == 0
    assert "2 shards: 1 parts already written, 1 to do" in capsys.readouterr().out
    assert table(copy).equals(table(root / "store"))
    changed = [*argv, "--out", str(copy), "--workers", "0"]
    changed[changed.index("--augmentations") + 1] = "2"
    assert main(changed) == 2
    assert "its augmentations differs" in capsys.readouterr().err

