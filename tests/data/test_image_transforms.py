import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from mmcl.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    PILInput,
    RandomResizedCropU8,
    ResizeCenterCropU8,
    normalize_uint8,
    torchvision_eval_transform,
    torchvision_train_transform,
)


def smooth_image(height=60, width=80, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def as_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def test_train_crop_matches_torchvision_reference_for_the_same_seed():
    image = smooth_image()
    ours = RandomResizedCropU8(32, scale=(0.3, 1.0))
    reference = torchvision_train_transform(32, scale=(0.3, 1.0))
    for seed in range(5):
        torch.manual_seed(seed)
        got = normalize_uint8(ours(as_tensor(image))[None], CLIP_MEAN, CLIP_STD)[0]
        torch.manual_seed(seed)
        expected = reference(image)
        assert got.shape == expected.shape == (3, 32, 32)
        # Same crop box (same RNG draws); resize kernels agree within 2 grey levels.
        step = 2 / 255 / min(CLIP_STD) + 1e-5
        assert (got - expected).abs().max().item() <= step


def test_eval_transform_matches_torchvision_reference():
    for height, width in [(60, 80), (80, 60), (32, 32)]:
        image = smooth_image(height, width)
        got = normalize_uint8(ResizeCenterCropU8(24)(as_tensor(image))[None], CLIP_MEAN, CLIP_STD)[0]
        expected = torchvision_eval_transform(24)(image)
        assert got.shape == (3, 24, 24)
        assert (got - expected).abs().max().item() <= 2 / 255 / min(CLIP_STD) + 1e-5


def test_normalize_uint8_values():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalize_uint8(images, CLIP_MEAN, CLIP_STD)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], abs=1e-5)
        assert out[1, c, 1, 1].item() == pytest.approx((1 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-5)


def test_max_reduction_keeps_every_crop_at_least_output_size():
    crop = RandomResizedCropU8(224, scale=(0.9, 1.0))
    assert crop.max_reduction(256, 341) == 1
    assert crop.max_reduction(1024, 768) == 3  # min side >= sqrt(0.9*1024*768*0.75) = 727 -> 3x
    for width, height in [(1024, 768), (3000, 500), (500, 3000), (900, 900)]:
        k = crop.max_reduction(width, height)
        image = torch.zeros(3, math.ceil(height / k), math.ceil(width / k), dtype=torch.uint8)
        for seed in range(50):
            torch.manual_seed(seed)
            _, _, h, w = T.RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
            assert min(h, w) >= 224 or min(image.shape[1:]) < 224
    assert ResizeCenterCropU8(224).max_reduction(1000, 460) == 2


def test_pil_input_adapts_pil_transforms():
    image = smooth_image()
    wrapped = PILInput(T.Compose([T.CenterCrop(10), T.PILToTensor()]))
    assert torch.equal(wrapped(as_tensor(image)), T.PILToTensor()(T.CenterCrop(10)(image)))
