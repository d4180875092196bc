"""Text tokenizer for the text tower: any `AutoTokenizer` (WordPiece, BPE, SentencePiece).

`build_tokenizer` makes two adjustments so that every tokenizer batches the same way:

- a tokenizer without a pad token (Llama/GPT-style) pads with its EOS token, else its UNK
  token; padded positions are masked out by the attention mask, so which id fills them does
  not matter to the poolers;
- padding is on the right, which absolute position embeddings (BERT, CLIP) expect; except for
  tokenizers in `KEEP_PADDING_SIDE`, whose towers were trained with their own side: SigLIP 2's
  (left: its text head reads the last position, which is then the caption's last token), as
  plain `transformers` pads with it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mmcl.models.settings import TextTowerConfig

_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


KEEP_PADDING_SIDE = ("Siglip2Tokenizer",)


class TokenizerLoadError(ValueError):
    """A tokenizer that cannot be loaded; the message is one sentence naming the config key."""


def build_tokenizer(cfg: TextTowerConfig, key: str = "model.text") -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.name_or_path)`, with a pad token and right padding."""
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
    if type(tokenizer).__name__ not in KEEP_PADDING_SIDE:
        tokenizer.padding_side = "right"
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
