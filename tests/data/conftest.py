"""Tiny img2dataset-layout shards written by the tests, and a tiny offline tokenizer."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmcl.config import DataConfig

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "tree", "sample", "number"]


def image_bytes(seed: int, size=(40, 32), fmt="JPEG", mode="RGB", **save_kw) -> bytes:
    """A distinct random image per seed, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **save_kw)
    return out.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Write `[(key, {ext: bytes})]` as a tar in img2dataset layout (`{key}.{ext}`)."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(key: str, seed: int, label: int | None = None) -> tuple[str, dict[str, bytes]]:
    files = {
        "jpg": image_bytes(seed),
        "txt": f"a photo of the {WORDS[seed % len(WORDS)]} number {seed}".encode(),
        "json": json.dumps({"key": key}).encode(),
    }
    if label is not None:
        files["cls"] = str(label).encode()
    return key, files


def write_dataset(
    root: Path, num_shards: int, per_shard: int, sizes: bool = True, labels: bool = False, prefix: str = ""
) -> tuple[str, list[str]]:
    """`num_shards` shards of `per_shard` good samples; returns (brace pattern, all keys)."""
    root.mkdir(parents=True, exist_ok=True)
    keys, table = [], {}
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            seed = s * 1000 + i
            key = f"{prefix}{s:03d}{i:04d}"
            samples.append(good_sample(key, seed, label=seed % 7 if labels else None))
            keys.append(key)
        write_shard(root / f"{s:05d}.tar", samples)
        table[f"{s:05d}.tar"] = per_shard
    if sizes:
        (root / "sizes.json").write_text(json.dumps(table))
    return str(root / f"{{00000..{num_shards - 1:05d}}}.tar"), keys


def data_config(pattern: str, **overrides) -> DataConfig:
    values = dict(train_shards=pattern, shuffle_buffer=8, num_workers=0, image_size=16, train_crop_scale=[0.5, 1.0])
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture
def kit():
    return SimpleNamespace(
        image_bytes=image_bytes, write_shard=write_shard, good_sample=good_sample,
        write_dataset=write_dataset, data_config=data_config,
    )
