"""Tiny shards with real JPEGs and a tiny transformers CLIP folder for the curation tests."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "blue", "car", "tree", "sample", "number"]
MEAN, STD = (0.45, 0.4, 0.35), (0.25, 0.2, 0.3)  # the model's processor's (neither CLIP's nor 0.5)


def jpeg(seed: int, size=(40, 32)) -> bytes:
    """A distinct random RGB JPEG per seed (W x H = size)."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def caption(seed: int) -> str:
    return f"a photo of the {WORDS[seed % len(WORDS)]} number {seed % 10}"


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """`[(key, {ext: bytes})]` as a tar in img2dataset layout (`{key}.{ext}`)."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(root: Path, num_shards: int, per_shard: int, bad: bool = False) -> tuple[str, list[str]]:
    """`num_shards` shards of `per_shard` samples (img2dataset layout, 40..56 x 28 JPEGs: under twice the
    16-px crop, so the decoder reads them at full size);
    with `bad`, shard 0 also holds a corrupt JPEG (position 2) and an empty caption (position 5).
    Returns (brace pattern, the good samples' keys)."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            seed = s * 1000 + i
            key = f"{s:03d}{i:04d}"
            files = {"jpg": jpeg(seed, (40 + i % 3 * 8, 28)), "txt": caption(seed).encode()}
            if bad and s == 0 and i == 2:
                files["jpg"] = b"\xff\xd8\xff\xe0" + b"\x13" * 300
            elif bad and s == 0 and i == 5:
                files["txt"] = b"  \n "
            else:
                good.append(key)
            samples.append((key, files))
        write_shard(root / f"{s:05d}.tar", samples)
    return str(root / f"{{00000..{num_shards - 1:05d}}}.tar"), good


def save_tokenizer(out: Path) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [str(d) for d in range(10)]
    (out / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)


def clip_folder(out: Path, seed: int = 3, image_size: int = 16, dim: int = 12, mean=MEAN, std=STD) -> Path:
    """A tiny random-init transformers CLIPModel with its image processor and tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config={"vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "max_position_embeddings": 16,
                                     "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0},
                        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32,
                                       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(mean), image_std=list(std)).save_pretrained(out)
    save_tokenizer(out)
    return out
