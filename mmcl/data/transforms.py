"""Image transforms: CLIP train/eval crops, batched normalisation, torchvision references.

The pipeline decodes every image once into an RGB `uint8` tensor `[3, H, W]` and hands it to
each transform. A transform returns either

- `uint8 [3, S, S]`: the pipeline stacks these and normalises the whole batch at once with the
  loader's mean/std (one pass, written straight into shared memory), or
- `float [3, S, S]`: taken as final (already normalised) and only stacked.

`RandomResizedCropU8` / `ResizeCenterCropU8` are the CLIP recipes in that form: torchvision's
`RandomResizedCrop` crop parameters (same RNG draws, so a seeded run picks the same box) and
its antialiased bicubic resize on uint8 tensors, which matches PIL's bicubic within 2 grey
levels and is ~3x faster. They also say how much the decoder may shrink an image before they
see it (`max_reduction`), so large JPEGs are decoded at 1/2, 1/4 or 1/8 size (DCT scaling)
whenever every possible crop keeps at least `S` pixels a side.

Randomness: transforms draw from the global `torch` (and `random`) generators, which the
pipeline re-seeds for every sample from (seed, epoch, rank, worker, position), so any
torchvision transform is deterministic and resume is exact. Transforms written for PIL
images (e.g. a `Compose` starting with PIL-only ops) are wrapped in `PILInput`.

`SSLViewU8` is SimCLR's augmentation (random resized crop, flip, colour jitter, grayscale,
Gaussian blur, and BYOL's solarize) on uint8 tensors; `ssl_view_pair` builds the two views of
SimCLR (symmetric) or BYOL (asymmetric blur and solarize) for the loader's `view_transforms`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torchvision.transforms as T
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RandomResizedCropU8",
    "ResizeCenterCropU8",
    "PILInput",
    "SSLViewU8",
    "ssl_view_pair",
    "clip_train_transform",
    "clip_eval_transform",
    "torchvision_train_transform",
    "torchvision_eval_transform",
    "normalize_uint8",
]


class RandomResizedCropU8:
    """uint8 [3, H, W] -> uint8 [3, size, size]: torchvision's RandomResizedCrop, bicubic, antialiased."""

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def __call__(self, image: Tensor) -> Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        return F.resized_crop(
            image, top, left, height, width, [self.size, self.size],
            interpolation=F.InterpolationMode.BICUBIC, antialias=True,
        )

    def max_reduction(self, width: int, height: int) -> int:
        """Largest factor the image may be shrunk by and still give every possible crop >= size px a side.

        A random crop has area >= scale[0]*W*H and aspect ratio in `ratio`, so both its sides are
        >= sqrt(scale[0]*W*H*min(ratio, 1/ratio)); torchvision's fallback crop keeps min(W, H).
        """
        shortest_ratio = min(self.ratio[0], 1 / self.ratio[1])
        side = min(math.sqrt(self.scale[0] * width * height * shortest_ratio), width, height)
        return max(1, int(side // self.size))

    def __repr__(self) -> str:
        return f"RandomResizedCropU8(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCropU8:
    """uint8 [3, H, W] -> uint8 [3, size, size]: shorter side to `size` (bicubic, antialiased), centre crop."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: Tensor) -> Tensor:
        resized = F.resize(image, [self.size], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(resized, [self.size, self.size])

    def max_reduction(self, width: int, height: int) -> int:
        return max(1, min(width, height) // self.size)

    def __repr__(self) -> str:
        return f"ResizeCenterCropU8(size={self.size})"


class PILInput:
    """Adapt a transform that expects a PIL image: uint8 [3, H, W] tensor -> PIL RGB -> `transform`."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image: Tensor) -> Tensor:
        array = image.permute(1, 2, 0).contiguous().numpy()
        return self.transform(Image.fromarray(array))

    def __repr__(self) -> str:
        return f"PILInput({self.transform!r})"


class SSLViewU8:
    """uint8 [3, H, W] -> uint8 [3, size, size]: one self-supervised view (SimCLR's recipe, BYOL's solarize).

    In order: RandomResizedCrop(size, crop_scale) (bicubic, antialiased); horizontal flip with
    `flip_p`; with `color_jitter_p`, brightness/contrast/saturation/hue jitter of strengths
    `color_jitter` in random order (torchvision's ColorJitter); grey with `grayscale_p`;
    Gaussian blur with `blur_p`, sigma uniform in `blur_sigma` and a kernel of 10% of the side
    (odd, >= 3; 23 px at 224 as in SimCLR); solarize (invert values >= 128) with `solarize_p`.
    Every random draw comes from the global torch generator, which the pipeline seeds per sample.
    """

    def __init__(
        self,
        size: int,
        crop_scale: Sequence[float] = (0.08, 1.0),
        flip_p: float = 0.5,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float = 0.0,
    ):
        self.crop = RandomResizedCropU8(size, scale=crop_scale)
        self.flip_p, self.color_jitter_p, self.grayscale_p = float(flip_p), float(color_jitter_p), float(grayscale_p)
        self.blur_p, self.solarize_p = float(blur_p), float(solarize_p)
        brightness, contrast, saturation, hue = (float(v) for v in color_jitter)
        self.jitter = T.ColorJitter(brightness, contrast, saturation, hue)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)

    def __call__(self, image: Tensor) -> Tensor:
        image = self.crop(image)
        if torch.rand(()) < self.flip_p:
            image = F.horizontal_flip(image)
        if torch.rand(()) < self.color_jitter_p:
            order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(
                self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue
            )
            for index in order.tolist():
                if index == 0 and brightness is not None:
                    image = F.adjust_brightness(image, brightness)
                elif index == 1 and contrast is not None:
                    image = F.adjust_contrast(image, contrast)
                elif index == 2 and saturation is not None:
                    image = F.adjust_saturation(image, saturation)
                elif index == 3 and hue is not None:
                    image = F.adjust_hue(image, hue)
        if torch.rand(()) < self.grayscale_p:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        if torch.rand(()) < self.blur_p:
            sigma = float(torch.empty(()).uniform_(*self.blur_sigma))
            image = F.gaussian_blur(image, [self.blur_kernel, self.blur_kernel], [sigma, sigma])
        if torch.rand(()) < self.solarize_p:
            image = F.solarize(image, 128)
        return image

    def max_reduction(self, width: int, height: int) -> int:
        return self.crop.max_reduction(width, height)

    def __repr__(self) -> str:
        return (f"SSLViewU8(size={self.crop.size}, crop_scale={self.crop.scale}, flip_p={self.flip_p}, "
                f"jitter={self.jitter}, color_jitter_p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
                f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, solarize_p={self.solarize_p})")


def ssl_view_pair(
    size: int,
    recipe: str = "simclr",
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip_p: float = 0.5,
    color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: Sequence[float] | None = None,
    blur_sigma: Sequence[float] = (0.1, 2.0),
    solarize_p: Sequence[float] | None = None,
) -> tuple[SSLViewU8, SSLViewU8]:
    """The two view transforms of `recipe`: "simclr" (blur 0.5/0.5, no solarize) or "byol"
    (blur 1.0/0.1, solarize 0/0.2). `blur_p` / `solarize_p` (one value per view) override them."""
    if recipe not in ("simclr", "byol"):
        raise ValueError(f"unknown view recipe {recipe!r}; use simclr or byol.")
    blur = list(blur_p) if blur_p is not None else ([1.0, 0.1] if recipe == "byol" else [0.5, 0.5])
    solarize = list(solarize_p) if solarize_p is not None else ([0.0, 0.2] if recipe == "byol" else [0.0, 0.0])
    return tuple(  # type: ignore[return-value]
        SSLViewU8(size, crop_scale, flip_p, color_jitter, color_jitter_p, grayscale_p, blur[v], blur_sigma, solarize[v])
        for v in (0, 1)
    )


def clip_train_transform(image_size: int = 224, scale: Sequence[float] = (0.9, 1.0)) -> RandomResizedCropU8:
    """CLIP's training crop (normalisation happens per batch in the pipeline)."""
    return RandomResizedCropU8(image_size, scale=scale)


def clip_eval_transform(image_size: int = 224) -> ResizeCenterCropU8:
    """CLIP's evaluation transform: resize shorter side, centre crop."""
    return ResizeCenterCropU8(image_size)


def torchvision_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    scale: Sequence[float] = (0.9, 1.0),
) -> T.Compose:
    """Reference: PIL image -> normalised float [3, S, S], the classic torchvision composition."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def torchvision_eval_transform(
    image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> T.Compose:
    """Reference: PIL image -> normalised float [3, S, S] (Resize shorter side + CenterCrop)."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def normalize_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float], out: Tensor | None = None) -> Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, 3, S, S] = (x / 255 - mean) / std, written into `out` if given."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32)
    out.copy_(images)
    return out.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
