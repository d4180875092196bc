"""Models: `transformers` towers -> pooling -> projection -> normalised features."""
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `mmcl.config` (which reads this package's settings) imports no torch.
_LAZY = {
    "DualEncoder": "mmcl.models.dual_encoder",
    "build_model": "mmcl.models.dual_encoder",
    "enable_gradient_checkpointing": "mmcl.models.dual_encoder",
    "Gather": "mmcl.models.ema",
    "MomentumEncoder": "mmcl.models.ema",
    "cosine_momentum": "mmcl.models.ema",
    "ema_update_": "mmcl.models.ema",
    "frozen_copy": "mmcl.models.ema",
    "no_gather": "mmcl.models.ema",
    "FloatBatchNorm1d": "mmcl.models.heads",
    "MLPHead": "mmcl.models.heads",
    "eval_frozen_modules": "mmcl.models.locking",
    "find_layer_stack": "mmcl.models.locking",
    "lock_tower": "mmcl.models.locking",
    "PatchDropout": "mmcl.models.patch_dropout",
    "attach_patch_dropout": "mmcl.models.patch_dropout",
    "patch_dropout_active": "mmcl.models.patch_dropout",
    "set_patch_dropout": "mmcl.models.patch_dropout",
    "KeyQueue": "mmcl.models.queue",
    "AUTO_POOLING": "mmcl.models.pooling",
    "POOLINGS": "mmcl.models.pooling",
    "pool": "mmcl.models.pooling",
    "pooled_width": "mmcl.models.pooling",
    "resolve_pooling": "mmcl.models.pooling",
    "build_projection": "mmcl.models.projection",
    "TokenizerLoadError": "mmcl.models.tokenizer",
    "build_tokenizer": "mmcl.models.tokenizer",
    "check_tokenizer_fits": "mmcl.models.tokenizer",
    "tokenize": "mmcl.models.tokenizer",
    "TowerLoadError": "mmcl.models.towers",
    "build_tower": "mmcl.models.towers",
}

__all__ = [
    "AUTO_POOLING",
    "POOLINGS",
    "DualEncoder",
    "FloatBatchNorm1d",
    "Gather",
    "KeyQueue",
    "MomentumEncoder",
    "MLPHead",
    "PatchDropout",
    "TokenizerLoadError",
    "TowerLoadError",
    "attach_patch_dropout",
    "build_model",
    "build_projection",
    "build_tokenizer",
    "build_tower",
    "check_tokenizer_fits",
    "cosine_momentum",
    "ema_update_",
    "enable_gradient_checkpointing",
    "eval_frozen_modules",
    "find_layer_stack",
    "frozen_copy",
    "no_gather",
    "lock_tower",
    "patch_dropout_active",
    "pool",
    "pooled_width",
    "resolve_pooling",
    "set_patch_dropout",
    "tokenize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
