"""NaFlex (SigLIP 2's native aspect ratio): an image -> a variable number of patches, then a padded batch.

`NaFlexPatchesU8` resizes each decoded RGB `uint8 [3, H, W]` image keeping its aspect ratio so that
its patch grid (h x w patches of P x P pixels) fits `max_num_patches`, with the same rule and
rounding as `transformers`' `Siglip2ImageProcessor` (a binary search on the scale, each side
rounded up to a multiple of P, at least one patch) and its resize (bilinear, antialiased, on
uint8), then cuts it into patches: `Patches.pixels` is `uint8 [h*w, 3*P*P]`, each row one patch
in the processor's order (patch rows, then columns; inside a patch pixel rows, pixel columns,
then channels). The transform is deterministic, so exact resume is unaffected.

`naflex_batch` normalises a list of `Patches` with the loader's mean/std and pads them to the
transform's sequence length `L` (= `max_num_patches`, as the processor pads):
`pixel_values` float32 [B, L, 3*P*P], `pixel_attention_mask` int32 [B, L] (1 = real patch),
`spatial_shapes` long [B, 2] (each image's grid h, w) — the inputs of `Siglip2VisionModel`.

`LengthSchedule` (training, `data.naflex.sequence_lengths` / `token_budget`): each optimizer step's
sequence length L, drawn uniformly from a list by (seed, epoch, step) — the same on every rank —
and its micro-batch size, `token_budget // L` with a budget. The data worker filling a batch asks
it for L before decoding, and resizes that batch's images to fit L patches.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .shards import derive_seed

__all__ = ["Patches", "NaFlexPatchesU8", "naflex_size", "patchify", "naflex_batch", "NaFlexEvalTransform", "unpack_naflex",
           "LengthSchedule"]


@dataclass
class Patches:
    """One image as NaFlex patches: `pixels` uint8 [h*w, 3*P*P], `grid` (h, w), padded later to `length`."""

    pixels: Tensor
    grid: tuple[int, int]
    length: int


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(target height, target width) in pixels: the largest aspect-preserving scale whose grid fits
    `max_num_patches`, each side rounded up to a multiple of `patch_size` (>= 1 patch).

    The binary search and rounding of `transformers`' `get_image_size_for_max_num_patches`, so the
    export's processor resizes every image to the same size.
    """
    def scaled(scale: float, size: int) -> int:
        return int(max(patch_size, math.ceil(size * scale / patch_size) * patch_size))

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def patchify(image: Tensor, patch_size: int) -> Tensor:
    """[C, h*P, w*P] -> [h*w, P*P*C], rows in raster order, each patch (pixel row, pixel column, channel)."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    grid = image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return grid.reshape(rows * cols, -1)


class NaFlexPatchesU8:
    """uint8 [3, H, W] -> `Patches` (uint8 [h*w, 3*P*P], grid (h, w)); see the module docstring."""

    def __init__(self, patch_size: int = 16, max_num_patches: int = 256):
        self.patch_size = int(patch_size)
        self.max_num_patches = int(max_num_patches)

    def __call__(self, image: Tensor) -> Patches:
        height, width = naflex_size(int(image.shape[-2]), int(image.shape[-1]), self.patch_size, self.max_num_patches)
        resized = F.resize(image, [height, width], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        grid = (height // self.patch_size, width // self.patch_size)
        return Patches(patchify(resized, self.patch_size).contiguous(), grid, self.max_num_patches)

    def max_reduction(self, width: int, height: int) -> int:
        return 1  # decode at full size: a DCT-shrunk JPEG would resize differently from the processor

    def __repr__(self) -> str:
        return f"NaFlexPatchesU8(patch_size={self.patch_size}, max_num_patches={self.max_num_patches})"


def naflex_batch(items: list[Patches], mean: Sequence[float], std: Sequence[float],
                 empty: Callable[[tuple[int, ...], torch.dtype], Tensor] | None = None) -> dict[str, Tensor]:
    """Patches -> {pixel_values [B, L, 3*P*P] float32 normalised, zeros where padded;
    pixel_attention_mask [B, L] int32; spatial_shapes [B, 2] long}. `empty(shape, dtype)` allocates
    pixel_values (shared memory in a data worker)."""
    length = max(item.length for item in items)
    width = items[0].pixels.shape[1]
    shape = (len(items), length, width)
    values = empty(shape, torch.float32) if empty is not None else torch.empty(shape, dtype=torch.float32)
    values.zero_()
    mask = torch.zeros((len(items), length), dtype=torch.int32)
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    for row, item in enumerate(items):
        count = item.pixels.shape[0]
        if count > length:
            raise ValueError(f"an image has {count} patches, more than the sequence length {length}.")
        pixels = item.pixels.view(count, -1, 3).float()  # channel is the fastest axis of a patch row
        values[row, :count].copy_(pixels.div_(255.0).sub_(mean_t).div_(std_t).view(count, width))
        mask[row, :count] = 1
    shapes = torch.tensor([item.grid for item in items], dtype=torch.long)
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


class NaFlexEvalTransform:
    """PIL image -> one packed float tensor [L + 1, 3*P*P] for the evaluation loaders, which stack a single
    tensor per image: rows 0..L-1 are `naflex_batch`'s normalised, zero-padded patches, and row L holds the
    image's grid (h, w) in its first two entries (the attention mask is the first h*w rows).
    `unpack_naflex` turns a stacked batch back into the tower's inputs. The fixed L = `max_num_patches` is
    what `Siglip2ImageProcessor` pads to, so evaluation sees each image as the export's processor does."""

    def __init__(self, patch_size: int, max_num_patches: int, mean: Sequence[float], std: Sequence[float]):
        self.patches = NaFlexPatchesU8(patch_size, max_num_patches)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image) -> Tensor:
        if not isinstance(image, Tensor):
            image = F.pil_to_tensor(image.convert("RGB"))
        batch = naflex_batch([self.patches(image)], self.mean, self.std)
        grid = torch.zeros((1, batch["pixel_values"].shape[-1]), dtype=torch.float32)
        grid[0, :2] = batch["spatial_shapes"][0].float()
        return torch.cat([batch["pixel_values"][0], grid])

    def __repr__(self) -> str:
        return f"NaFlexEvalTransform({self.patches!r}, mean={self.mean}, std={self.std})"


def unpack_naflex(packed: Tensor) -> dict[str, Tensor]:
    """[B, L + 1, 3*P*P] (stacked `NaFlexEvalTransform` outputs) -> {pixel_values [B, L, 3*P*P],
    pixel_attention_mask [B, L] int32, spatial_shapes [B, 2] long}, on `packed`'s device."""
    values = packed[:, :-1]
    shapes = packed[:, -1, :2].round().long()
    count = shapes[:, 0] * shapes[:, 1]
    mask = (torch.arange(values.shape[1], device=packed.device)[None, :] < count[:, None]).to(torch.int32)
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


@dataclass
class LengthSchedule:
    """Per-step sequence lengths and micro-batch sizes of NaFlex training.

    lengths: the sequence lengths L a step may have, drawn uniformly (a repeated entry weighs more).
    token_budget: patch tokens per micro-batch per rank: B_L = token_budget // L; None = `batch_size` images.
    grad_accum_steps: micro-batches per optimizer step (they share one L).

    Batch `index` of an epoch on a rank (0-based, counted over the rank's micro-batches) belongs to
    optimizer step `index // grad_accum_steps` of the epoch, whose L is drawn from
    derive_seed(seed, "sequence-length", epoch, step): a function of the step alone, so every rank
    and every resumed run draws the same L.
    """

    patch_size: int
    lengths: list[int]
    token_budget: int | None
    batch_size: int
    grad_accum_steps: int = 1
    _transforms: dict[int, NaFlexPatchesU8] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"sequence lengths must be a non-empty list of positive lengths, got {self.lengths}.")
        if self.token_budget is not None and self.token_budget < max(self.lengths):
            raise ValueError(f"the token budget {self.token_budget} is less than one image at the longest sequence "
                             f"length {max(self.lengths)}.")

    def length(self, seed: int, epoch: int, index: int) -> int:
        """L of batch `index` of `epoch` (see the class docstring)."""
        step = index // self.grad_accum_steps
        return self.lengths[random.Random(derive_seed(seed, "sequence-length", epoch, step)).randrange(len(self.lengths))]

    def batch_size_at(self, length: int) -> int:
        """Images per micro-batch at sequence length `length`."""
        return self.token_budget // length if self.token_budget is not None else self.batch_size

    def batch_sizes(self) -> list[int]:
        """B_L for each entry of `lengths`."""
        return [self.batch_size_at(length) for length in self.lengths]

    @property
    def expected_batch(self) -> float:
        """Mean images per micro-batch (each length equally likely)."""
        return sum(self.batch_sizes()) / len(self.lengths)

    def batches_per_epoch(self, total: int, world_size: int) -> int:
        """Micro-batches per rank for an epoch of `total` samples: total // (expected batch x ranks), rounded
        down to whole optimizer steps (so an optimizer step never spans two epochs)."""
        batches = total * len(self.lengths) // (sum(self.batch_sizes()) * world_size)
        return batches - batches % self.grad_accum_steps

    def transform(self, length: int) -> NaFlexPatchesU8:
        """The patch transform of a batch of length `length` (one per length, kept)."""
        if length not in self._transforms:
            self._transforms[length] = NaFlexPatchesU8(self.patch_size, length)
        return self._transforms[length]

    def identity(self) -> dict:
        """What a saved stream state records of the schedule (resume checks it)."""
        return {"sequence_lengths": list(self.lengths), "token_budget": self.token_budget}
