"""Batched caption tokenisation to a fixed context length.

`CaptionTokenizer(tokenizer, L)(texts) -> (input_ids [B, L] long, attention_mask [B, L] long)`.
`tokenizer` is a `transformers` tokenizer (called once per batch, padded to `max_length` and
truncated, special tokens included) or any callable taking a list of strings and returning
token id lists, a `[B, L']` tensor (OpenCLIP's tokenizers) or a dict with `input_ids`
(and optionally `attention_mask`). Id lists are padded on the tokenizer's `padding_side`
(right by default) with its pad id (else its eos id, else 0); tensors are cut or padded to L
and, without an explicit mask, positions holding the pad id are masked out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class CaptionTokenizer:
    """Tokenise a list of captions into fixed-length id and mask tensors."""

    def __init__(self, tokenizer: Callable[..., Any], context_length: int):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.is_hf = hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "model_max_length")
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        texts = list(texts)
        length = self.context_length
        if self.is_hf:
            if getattr(self.tokenizer, "pad_token_id", None) is not None:
                encoded = self.tokenizer(
                    texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
                )
                return encoded["input_ids"].long(), encoded["attention_mask"].long()
            # No pad token (GPT-2 style): truncate here, pad by hand with eos.
            return self._pad_lists(self.tokenizer(texts, truncation=True, max_length=length)["input_ids"])
        output = self.tokenizer(texts)
        mask = None
        if isinstance(output, dict) or hasattr(output, "keys"):
            mask = output.get("attention_mask")
            output = output["input_ids"]
        if isinstance(output, Tensor):
            ids = output.long()
            mask = mask.long() if isinstance(mask, Tensor) else (ids != self.pad_id).long()
            return self._fit(ids, self.pad_id), self._fit(mask, 0)
        ids, mask_t = self._pad_lists(output)
        return ids, mask_t

    def _pad_lists(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        length = self.context_length
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            row = list(row)[:length]
            if not row:
                continue
            where = slice(length - len(row), length) if self.left else slice(0, len(row))
            ids[i, where] = torch.as_tensor(row, dtype=torch.long)
            mask[i, where] = 1
        return ids, mask

    def _fit(self, tensor: Tensor, fill: int) -> Tensor:
        length = self.context_length
        if tensor.shape[1] >= length:
            return tensor[:, :length].contiguous()
        pad = torch.full((tensor.shape[0], length - tensor.shape[1]), fill, dtype=tensor.dtype)
        return torch.cat([tensor, pad], dim=1)
