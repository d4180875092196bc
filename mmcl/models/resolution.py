"""Resolution changes for pretrained ViT-family towers: the position table interpolated once, at load.

A ViT learns one position embedding per patch of its training grid (224 px / 16 = 14 x 14),
plus one for each prefix token (the class token; DeiT's distillation token). Training or
fine-tuning at another `data.image_size` (CLIPA pre-trains at low resolution and finishes
at full resolution; FLIP fine-tunes at a new size) needs a table for the new grid. This
module resamples the grid part of the table bicubically (`align_corners=False`, the same
call `transformers`' own `interpolate_pos_encoding=True` forward makes), keeps the prefix
tokens' rows as they are, and updates the tower's config and size attributes, so that:

- the tower then runs at the new size without `interpolate_pos_encoding` (and without
  paying for the interpolation in every forward);
- the table is a plain parameter that trains at the new size;
- the tower's `config.image_size` is the new size, so mmcl's model folder and the
  `transformers` export carry it, and plain `transformers` loads the export as it is.

Towers without a learned absolute position table (ConvNeXt, ResNet, Swin's relative
positions) take any size already and are left as they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResolutionError(ValueError):
    """A tower whose position table cannot be resized; the message is one sentence."""


def interpolate_grid(table: torch.Tensor, prefix_tokens: int, new_grid: int) -> torch.Tensor:
    """[P + g*g, D] position table -> [P + new_grid**2, D]: the P prefix rows kept, the g x g grid
    resampled bicubically (align_corners=False), computed in float32 and returned in the table's dtype."""
    prefix, grid = table[:prefix_tokens], table[prefix_tokens:]
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ResolutionError(f"the position table's {grid.shape[0]} patch rows are not a square grid.")
    dim = grid.shape[-1]
    image = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, g, g]
    resized = F.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(table.dtype)
    return torch.cat([prefix, resized])


def _side(value) -> int:
    """An int image/patch size, or the side of a square (h, w) one."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ResolutionError(f"non-square size {tuple(value)} is not supported.")
        return int(value[0])
    return int(value)


def _position_table(tower: nn.Module) -> tuple[nn.Module, str] | None:
    """(module, attribute) of the learned absolute position table: ViT/DeiT/DINOv2's
    `position_embeddings` parameter [1, T, D] or CLIP/SigLIP's `position_embedding` nn.Embedding [T, D]."""
    for module in tower.modules():
        if isinstance(getattr(module, "position_embeddings", None), nn.Parameter):
            return module, "position_embeddings"
        if isinstance(getattr(module, "position_embedding", None), nn.Embedding):
            return module, "position_embedding"
    return None


def resize_position_embeddings(tower: nn.Module, image_size: int, key: str = "model.image") -> str | None:
    """Make a pretrained image `tower` (a `transformers` model) run at `image_size` px, in place.

    Returns a one-line description of the change, or None when nothing was needed (same
    size, or a tower without an absolute position table). Raises `ResolutionError` when the
    new size is not a whole number of patches.
    """
    config = getattr(tower, "config", None)
    if config is None or getattr(config, "image_size", None) is None or getattr(config, "patch_size", None) is None:
        return None
    old_size, patch = _side(config.image_size), _side(config.patch_size)
    if old_size == image_size:
        return None
    found = _position_table(tower)
    if found is None:
        return None
    if image_size % patch:
        raise ResolutionError(
            f"'data.image_size' = {image_size} is not a multiple of the '{key}' tower's patch size {patch}; "
            f"use a multiple such as {max(patch, image_size // patch * patch)}."
        )
    old_grid, new_grid = old_size // patch, image_size // patch
    module, name = found
    embedding = getattr(module, name)
    table = embedding.weight if isinstance(embedding, nn.Embedding) else embedding[0]  # [T, D]
    prefix = table.shape[0] - old_grid * old_grid
    if prefix < 0:
        raise ResolutionError(f"the '{key}' tower's position table is smaller than its {old_grid}x{old_grid} patch grid.")
    with torch.no_grad():
        resized = interpolate_grid(table, prefix, new_grid)
        if isinstance(embedding, nn.Embedding):
            replacement = nn.Embedding(resized.shape[0], resized.shape[1], device=table.device, dtype=table.dtype)
            replacement.weight.copy_(resized)
            replacement.weight.requires_grad_(table.requires_grad)
            setattr(module, name, replacement)
            _mark_loaded(replacement, replacement.weight)
            if isinstance(getattr(module, "position_ids", None), torch.Tensor):
                module.position_ids = torch.arange(resized.shape[0], device=module.position_ids.device).expand((1, -1))
                _mark_loaded(module.position_ids)
        else:
            setattr(module, name, nn.Parameter(resized.unsqueeze(0), requires_grad=embedding.requires_grad))
            _mark_loaded(getattr(module, name))
    _update_size_attributes(tower, old_size, image_size, new_grid, prefix)
    config.image_size = image_size
    return (f"'{key}': position embeddings interpolated from {old_size} px ({old_grid}x{old_grid} patches) to "
            f"{image_size} px ({new_grid}x{new_grid}), bicubic; {prefix} prefix token(s) kept")


def _mark_loaded(*items) -> None:
    """Flag new tensors/modules as loaded weights: `transformers` 5 re-initialises anything unflagged
    when a model is later built around this tower (e.g. VisionTextDualEncoderModel at export)."""
    for item in items:
        item._is_hf_initialized = True


def _update_size_attributes(tower: nn.Module, old_size: int, new_size: int, new_grid: int, prefix: int) -> None:
    """The size bookkeeping `transformers` keeps on its embedding modules (ViT's patch embeddings
    refuse inputs that differ from their `image_size`; CLIP's embeddings too)."""
    for module in tower.modules():
        size = getattr(module, "image_size", None)
        if isinstance(size, int) and size == old_size:
            module.image_size = new_size
        elif isinstance(size, (tuple, list)) and tuple(size) == (old_size, old_size):
            module.image_size = type(size)((new_size, new_size))
        if isinstance(getattr(module, "num_patches", None), int):
            module.num_patches = new_grid * new_grid
        if isinstance(getattr(module, "num_positions", None), int):
            module.num_positions = new_grid * new_grid + prefix
