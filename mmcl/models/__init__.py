"""Models: `transformers` towers -> pooling -> projection -> normalised features."""
from mmcl.models.dual_encoder import DualEncoder, build_model, enable_gradient_checkpointing
from mmcl.models.locking import eval_frozen_modules, find_layer_stack, lock_tower
from mmcl.models.pooling import AUTO_POOLING, POOLINGS, pool, pooled_width, resolve_pooling
from mmcl.models.projection import build_projection
from mmcl.models.tokenizer import TokenizerLoadError, build_tokenizer, check_tokenizer_fits, tokenize
from mmcl.models.towers import TowerLoadError, build_tower

__all__ = [
    "AUTO_POOLING",
    "POOLINGS",
    "DualEncoder",
    "TokenizerLoadError",
    "TowerLoadError",
    "build_model",
    "build_projection",
    "build_tokenizer",
    "build_tower",
    "check_tokenizer_fits",
    "enable_gradient_checkpointing",
    "eval_frozen_modules",
    "find_layer_stack",
    "lock_tower",
    "pool",
    "pooled_width",
    "resolve_pooling",
    "tokenize",
]
