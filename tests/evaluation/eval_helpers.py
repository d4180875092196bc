"""Tiny shards and a tiny open_clip architecture for the evaluation tests."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]
CLASSNAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]

TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def png_bytes(colour: tuple[int, int, int], size: int = 40, variant: int = 0) -> bytes:
    """A real PNG: a coloured square with a small grey patch that moves with `variant`."""
    image = Image.new("RGB", (size, size), colour)
    image.paste((128, 128, 128), (variant % size, variant % size, variant % size + 6, variant % size + 6))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, samples: list[dict[str, bytes]], per_shard: int) -> list[Path]:
    """img2dataset layout: {key}.png / {key}.cls / {key}.txt in shards of `per_shard` samples."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"{number:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for offset, sample in enumerate(samples[start : start + per_shard]):
                key = f"{number:05d}{offset:04d}"
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def classification_samples(n: int) -> list[dict[str, bytes]]:
    return [{"png": png_bytes(COLOURS[i % 6], variant=i), "cls": str(i % 6).encode()} for i in range(n)]


def caption_samples(n: int) -> list[dict[str, bytes]]:
    """Image + several captions (a JSON list), like COCO; every third sample has one plain caption."""
    out = []
    for i in range(n):
        name = CLASSNAMES[i % 6]
        captions = [f"a {name} square", f"picture {i} in {name}"] if i % 3 else f"a photo of thing {i}"
        text = json.dumps(captions) if isinstance(captions, list) else captions
        out.append({"png": png_bytes(COLOURS[i % 6], variant=i), "txt": text.encode()})
    return out


@pytest.fixture(scope="session")
def tiny_openclip(tmp_path_factory):
    """(model name, config file, weights file) of a tiny random open_clip CLIP."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("openclip")
    config = folder / "TinyEvalCLIP.json"
    config.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("TinyEvalCLIP")
    weights = folder / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return "TinyEvalCLIP", config, weights
