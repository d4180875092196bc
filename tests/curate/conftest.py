"""Score folders in `mmcl curate score`'s format (docs/guides/curation.md), written by the tests, and tiny shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from curate_helpers import clip_folder, write_shard


def write_scores(root: Path, parts: list[list[dict]], dim: int | None = None) -> Path:
    """Write root/parts/<i:05d>-<stem>.parquet, one per list of rows; each row a dict with key, score, and
    optionally caption, image_embedding ([D] floats; default zeros), shard, index. Returns root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "parts").mkdir(parents=True, exist_ok=True)
    dim = dim or max((len(r["image_embedding"]) for p in parts for r in p if "image_embedding" in r), default=4)
    for i, rows in enumerate(parts):
        shard = f"shards/{i:05d}.tar"
        images = np.array([r.get("image_embedding", np.zeros(dim)) for r in rows], dtype=np.float16).reshape(-1)
        texts = np.array([r.get("text_embedding", np.zeros(dim)) for r in rows], dtype=np.float16).reshape(-1)
        table = pa.table({
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "shard": pa.array([r.get("shard", shard) for r in rows], pa.string()),
            "index": pa.array([r.get("index", j) for j, r in enumerate(rows)], pa.int32()),
            "caption": pa.array([r.get("caption", "") for r in rows], pa.string()),
            "score": pa.array([r["score"] for r in rows], pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(images, pa.float16()), dim),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(texts, pa.float16()), dim),
        })
        table = table.replace_schema_metadata({"mmcl": json.dumps({"skips": {}, "samples": len(rows)})})
        pq.write_table(table, root / "parts" / f"{i:05d}-{i:05d}.parquet")
    (root / "mmcl_curate.json").write_text(json.dumps({"command": "score", "embedding_dim": dim, "version": 1}))
    return root


def image_bytes(seed: int, size=(24, 20)) -> bytes:
    """A distinct random JPEG per seed."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, "JPEG")
    return out.getvalue()


def tar_members(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of a tar file."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "tree", "sample", "number"]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.fixture
def kit():
    return SimpleNamespace(write_scores=write_scores, image_bytes=image_bytes, write_shard=write_shard,
                           tar_members=tar_members)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random-init transformers CLIPModel folder (16 px, D = 12) with its processor and tokenizer."""
    return clip_folder(tmp_path_factory.mktemp("clip"))
