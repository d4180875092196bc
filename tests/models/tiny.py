"""Tiny tower configs (hidden 32, 2 layers, 32-px images) and inputs shared by the model tests."""
from __future__ import annotations

import torch

from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig

_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

IMAGE_CONFIGS = {
    "vit": dict(model_type="vit", image_size=32, patch_size=8, **_ENCODER),
    "clip_vision_model": dict(model_type="clip_vision_model", image_size=32, patch_size=8, **_ENCODER),
    "convnext": dict(model_type="convnext", num_stages=2, hidden_sizes=[16, 24], depths=[1, 1], patch_size=4),
}
TEXT_CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=100, max_position_embeddings=32, **_ENCODER, **_NO_DROPOUT),
    "roberta": dict(
        model_type="roberta", vocab_size=100, max_position_embeddings=34, pad_token_id=1, **_ENCODER, **_NO_DROPOUT
    ),
    "clip_text_model": dict(
        model_type="clip_text_model", vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=3,
        pad_token_id=1, **_ENCODER,
    ),
    "t5": dict(model_type="t5", vocab_size=100, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, dropout_rate=0.0),
}
EMBED_DIM = 16
CONTEXT = 12
LENGTHS = (5, 12)  # tokens kept per row of `text_batch` (row 0 is right-padded)


def image_batch(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """pixel_values [B, 3, 32, 32]."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text_batch(lengths=LENGTHS, context: int = CONTEXT, eos_id: int = 3, pad_id: int = 1, seed: int = 0):
    """input_ids, attention_mask [B, context]: random tokens (ids 4..99) ending in `eos_id`, right-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((len(lengths), context), pad_id)
    attention_mask = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, : length - 1] = torch.randint(4, 100, (length - 1,), generator=generator)
        input_ids[row, length - 1] = eos_id
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def model_config(image: str = "vit", text: str | None = "bert", **overrides) -> ModelConfig:
    """A ModelConfig over the tiny towers; `image_*` / `text_*` keyword overrides go to the towers."""
    image_options = {k[6:]: v for k, v in overrides.items() if k.startswith("image_")}
    text_options = {k[5:]: v for k, v in overrides.items() if k.startswith("text_")}
    model_options = {k: v for k, v in overrides.items() if not k.startswith(("image_", "text_"))}
    image_cfg = TowerConfig(config=dict(IMAGE_CONFIGS[image]), **image_options)
    text_cfg = None
    if text is not None:
        text_options.setdefault("context_length", CONTEXT)
        text_cfg = TextTowerConfig(config=dict(TEXT_CONFIGS[text]), tokenizer="unused", **text_options)
    model_options.setdefault("embed_dim", EMBED_DIM)
    return ModelConfig(image=image_cfg, text=text_cfg, **model_options)
