"""Data: shard lists, WebDataset pipelines, transforms, tokenization, stream state.

Entry points: `build_train_loader` / `build_eval_loader` (loader.py) return a `ShardLoader`
with `state_dict()` / `load_state_dict()` for exact resume, `skip_counts()` and
`steps_per_epoch`. See loader.py for the design.
"""
from __future__ import annotations

from mmcl.lazy import lazy_names

# Imported on first use, so that `mmcl.config` (which reads this package's settings) imports no torch.
_LAZY = {
    "BadSample": "mmcl.data.decode",
    "decode_caption": "mmcl.data.decode",
    "decode_image": "mmcl.data.decode",
    "NoDataError": "mmcl.data.loader",
    "ShardLoader": "mmcl.data.loader",
    "build_eval_loader": "mmcl.data.loader",
    "build_train_loader": "mmcl.data.loader",
    "SKIP_REASONS": "mmcl.data.samples",
    "NoShardsError": "mmcl.data.shards",
    "expand_shards": "mmcl.data.shards",
    "read_shard_sizes": "mmcl.data.shards",
    "CaptionTokenizer": "mmcl.data.tokenize",
    "CLIP_MEAN": "mmcl.data.transforms",
    "CLIP_STD": "mmcl.data.transforms",
    "PILInput": "mmcl.data.transforms",
    "RandomResizedCropU8": "mmcl.data.transforms",
    "ResizeCenterCropU8": "mmcl.data.transforms",
    "SSLViewU8": "mmcl.data.transforms",
    "clip_eval_transform": "mmcl.data.transforms",
    "clip_train_transform": "mmcl.data.transforms",
    "normalize_uint8": "mmcl.data.transforms",
    "ssl_view_pair": "mmcl.data.transforms",
    "torchvision_eval_transform": "mmcl.data.transforms",
    "torchvision_train_transform": "mmcl.data.transforms",
}

__all__ = [
    "BadSample", "decode_caption", "decode_image",
    "NoDataError", "ShardLoader", "build_eval_loader", "build_train_loader",
    "SKIP_REASONS", "NoShardsError", "expand_shards", "read_shard_sizes", "CaptionTokenizer",
    "CLIP_MEAN", "CLIP_STD", "PILInput", "RandomResizedCropU8", "ResizeCenterCropU8", "SSLViewU8", "ssl_view_pair",
    "clip_eval_transform", "clip_train_transform", "normalize_uint8",
    "torchvision_eval_transform", "torchvision_train_transform",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
