"""Models: `transformers` towers -> pooling -> projection -> normalised features."""
from mmcl.models.dual_encoder import DualEncoder, build_model, enable_gradient_checkpointing
from mmcl.models.ema import Gather, MomentumEncoder, cosine_momentum, ema_update_, frozen_copy, no_gather
from mmcl.models.heads import FloatBatchNorm1d, MLPHead
from mmcl.models.locking import eval_frozen_modules, find_layer_stack, lock_tower
from mmcl.models.patch_dropout import PatchDropout, attach_patch_dropout, patch_dropout_active, set_patch_dropout
from mmcl.models.queue import KeyQueue
from mmcl.models.pooling import AUTO_POOLING, POOLINGS, pool, pooled_width, resolve_pooling
from mmcl.models.projection import build_projection
from mmcl.models.tokenizer import TokenizerLoadError, build_tokenizer, check_tokenizer_fits, tokenize
from mmcl.models.towers import TowerLoadError, build_tower

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
