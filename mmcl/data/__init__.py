"""Data: shard lists, WebDataset pipelines, transforms, tokenization, stream state.

Entry points: `build_train_loader` / `build_eval_loader` (loader.py) return a `ShardLoader`
with `state_dict()` / `load_state_dict()` for exact resume, `skip_counts()` and
`steps_per_epoch`. See loader.py for the design.
"""
from .decode import BadSample, decode_caption, decode_image
from .loader import NoDataError, ShardLoader, build_eval_loader, build_train_loader
from .samples import SKIP_REASONS
from .shards import NoShardsError, expand_shards, read_shard_sizes
from .tokenize import CaptionTokenizer
from .transforms import (
    CLIP_MEAN,
    CLIP_STD,
    PILInput,
    RandomResizedCropU8,
    ResizeCenterCropU8,
    SSLViewU8,
    clip_eval_transform,
    clip_train_transform,
    normalize_uint8,
    ssl_view_pair,
    torchvision_eval_transform,
    torchvision_train_transform,
)

__all__ = [
    "BadSample", "decode_caption", "decode_image",
    "NoDataError", "ShardLoader", "build_eval_loader", "build_train_loader",
    "SKIP_REASONS", "NoShardsError", "expand_shards", "read_shard_sizes", "CaptionTokenizer",
    "CLIP_MEAN", "CLIP_STD", "PILInput", "RandomResizedCropU8", "ResizeCenterCropU8", "SSLViewU8", "ssl_view_pair",
    "clip_eval_transform", "clip_train_transform", "normalize_uint8",
    "torchvision_eval_transform", "torchvision_train_transform",
]
