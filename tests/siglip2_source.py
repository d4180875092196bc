"""A tiny random Siglip2Model folder with a Gemma-style tokenizer and a Siglip2Processor, built offline."""
from __future__ import annotations

import io
import json
import string
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
PATCH, MAX_PATCHES, CONTEXT = 8, 16, 12
SIZES = [(40, 16), (16, 40), (32, 32), (90, 20)]  # (width, height): wide, tall, square, very wide
CAPTIONS = ["a photo of the digit 7", "the number 3", "a tall tree", "a wide car"]


def mixed_images(sizes: list[tuple[int, int]] = SIZES) -> list[Image.Image]:
    """Random RGB images of the given (width, height), one seed each."""
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
            for i, (w, h) in enumerate(sizes)]


def write_caption_shard(folder: Path, images: list[Image.Image], captions: list[str]) -> Path:
    """folder/00000.tar (PNG + caption per sample) and its sizes.json; returns the shard's path."""
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, (image, caption) in enumerate(zip(images, captions)):
            out = io.BytesIO()
            image.save(out, "PNG")
            for ext, data in (("png", out.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": len(captions)}))
    return folder / "00000.tar"


def write_class_shard(folder: Path, images: list[Image.Image], labels: list[int]) -> Path:
    """folder/00000.tar (PNG + class index per sample, as zero-shot shards hold them); returns the shard's path."""
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            out = io.BytesIO()
            image.save(out, "PNG")
            for ext, data in (("png", out.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder / "00000.tar"


MERGES = [("▁", "a"), ("o", "f"), ("t", "h"), ("th", "e")]


def _vocabulary() -> dict[str, int]:
    """Gemma's special tokens at ids 0..4, then characters, then the merges' pieces."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = ["▁"] + list(string.ascii_lowercase + string.digits)
    return {token: i for i, token in enumerate(specials + chars + ["".join(m) for m in MERGES])}


def gemma_tokenizer():
    """A character-level GemmaTokenizer (BPE over a fixed vocabulary with a few merges): no download."""
    from transformers import GemmaTokenizer

    return GemmaTokenizer(vocab=_vocabulary(), merges=MERGES)


def siglip2_tokenizer(max_length: int = CONTEXT):
    """The same vocabulary and merges as a Siglip2Tokenizer (lowercasing, padded on the left, so SigLIP 2's text
    head reads each caption's last token), as `mmcl-train-tokenizer --siglip2` saves one: no download."""
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    return Siglip2Tokenizer(vocab=_vocabulary(), merges=MERGES, model_max_length=max_length)


def write_siglip2_source(folder, logit_scale: float = 2.3, logit_bias: float = -6.5):
    """Save a Siglip2Model + Siglip2Processor (mean/std 0.4/0.5/0.6, 0.2/0.3/0.4) into `folder`; returns the model."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    config = Siglip2Config(vision_config=dict(patch_size=PATCH, num_patches=MAX_PATCHES, **ENCODER),
                           text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT, **ENCODER))
    model = Siglip2Model(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
        model.logit_bias.fill_(logit_bias)
    model.save_pretrained(str(folder))
    images = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.3, 0.4])
    Siglip2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    return model
