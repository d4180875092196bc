"""Text tokenizer for the text tower: any `AutoTokenizer` (WordPiece, BPE, SentencePiece).

`build_tokenizer` makes two adjustments so that every tokenizer batches the same way:

- a tokenizer without a pad token (Llama/GPT-style) pads with its EOS token, else its UNK
  token; padded positions are masked out by the attention mask, so which id fills them does
  not matter to the poolers;
- padding is on the right, which absolute position embeddings (BERT, CLIP) expect; except for
  tokenizers in `KEEP_PADDING_SIDE`, whose towers were trained with their own side, and for
  SigLIP 2 text towers (`LEFT_PADDED_TOWERS`) with any other tokenizer: SigLIP 2's text head reads
  the last position, which left padding makes the caption's last token, as `Siglip2Tokenizer` pads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmcl.models.settings import TextTowerConfig

_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


KEEP_PADDING_SIDE = ("Siglip2Tokenizer",)
# Text towers (model types) whose head reads the last position: padded on the left whatever the
# tokenizer, so the head reads the caption (the export's loader applies the same rule).
LEFT_PADDED_TOWERS = ("siglip2_text_model", "siglip2")


def padding_side(tokenizer: PreTrainedTokenizerBase, tower_type: str | None) -> str:
    """The side mmcl pads `tokenizer` on for a text tower of model type `tower_type` (None: unknown)."""
    if type(tokenizer).__name__ in KEEP_PADDING_SIDE:
        return tokenizer.padding_side
    return "left" if tower_type in LEFT_PADDED_TOWERS else "right"


def _tower_type(cfg: TextTowerConfig) -> str | None:
    """The text tower's model type: the inline config's, else the `name_or_path` folder's (None if unknown)."""
    if cfg.config:
        return cfg.config.get("model_type")
    if cfg.name_or_path is None:
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.name_or_path).model_type
    except _LOAD_ERRORS:  # an unreachable hub id: the tower's own load says so later
        return None


class TokenizerLoadError(ValueError):
    """A tokenizer that cannot be loaded; the message is one sentence naming the config key."""


def build_tokenizer(cfg: TextTowerConfig, key: str = "model.text") -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path)`, with a pad token and the tower's padding side."""
    source = f"{key}.tokenizer" if cfg.tokenizer else f"{key}.name_or_path"
    value = cfg.tokenizer or cfg.name_or_path
    if value is None:
        raise TokenizerLoadError(f"'{key}.tokenizer' is needed because the text tower has no name_or_path.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(value)
    except _LOAD_ERRORS as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise TokenizerLoadError(
            f"'{source}' = '{value}' could not be loaded as a tokenizer ({reason}); give a directory written by "
            "a transformers tokenizer's save_pretrained, or an existing Hugging Face hub id."
        ) from error
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TokenizerLoadError(
                f"the tokenizer from '{source}' = '{value}' has no pad, eos or unk token to pad with; add a pad "
                "token to it (tokenizer.add_special_tokens) and save it again."
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = padding_side(tokenizer, _tower_type(cfg))
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str], context_length: int) -> dict[str, torch.Tensor]:
    """texts (B strings) -> `input_ids`, `attention_mask`: [B, context_length] int64.

    Longer texts are truncated (the tokenizer keeps its special tokens, e.g. the final EOS);
    shorter ones are padded to exactly context_length.
    """
    if isinstance(texts, str):
        texts = [texts]
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, text_tower: PreTrainedModel, key: str = "model.text") -> None:
    """Raise (one sentence) when the tokenizer can produce ids beyond the tower's embedding table."""
    vocab_size = getattr(text_tower.config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer for '{key}' has {len(tokenizer)} tokens but the text tower's vocab_size is {vocab_size}; "
            f"set '{key}.config.vocab_size' to at least {len(tokenizer)} or use the tower's own tokenizer."
        )
