"""SSL view augmentations (SimCLR's recipe, BYOL's asymmetric pair) on uint8 images, and in the loader."""
import pytest
import torch

from mmcl.data import SSLViewU8, build_train_loader, ssl_view_pair


def colourful(seed: int = 0, size: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def draw(transform, image, seed):
    torch.manual_seed(seed)
    return transform(image)


def test_view_is_uint8_at_size_and_a_function_of_the_seed():
    view = SSLViewU8(16)
    image = colourful()
    first, again, other = draw(view, image, 1), draw(view, image, 1), draw(view, image, 2)
    assert first.shape == (3, 16, 16) and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_strengths_are_honoured():
    image = colourful()
    plain = dict(crop_scale=(1.0, 1.0), flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    identity = SSLViewU8(24, **plain)
    resized = draw(identity, image, 0)
    assert (resized.int() - image.int()).abs().max() <= 2  # full-image crop at the same size
    grey = draw(SSLViewU8(24, **{**plain, "grayscale_p": 1.0}), image, 0)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    flipped = draw(SSLViewU8(24, **{**plain, "flip_p": 1.0}), image, 0)
    assert torch.equal(flipped, resized.flip(-1))
    solarized = draw(SSLViewU8(24, **{**plain, "solarize_p": 1.0}), image, 0)
    assert torch.equal(solarized, torch.where(resized >= 128, 255 - resized, resized))
    blurred = draw(SSLViewU8(24, **{**plain, "blur_p": 1.0, "blur_sigma": (2.0, 2.0)}), image, 0)
    assert blurred.float().std() < 0.6 * resized.float().std()  # smoothing removes most of the noise
    jittered = draw(SSLViewU8(24, **{**plain, "color_jitter_p": 1.0, "color_jitter": (0.8, 0.0, 0.0, 0.0)}), image, 0)
    ratio = jittered.float().mean() / resized.float().mean()
    assert not torch.equal(jittered, resized) and 0.2 < ratio < 1.8  # brightness only: a global scale


def test_blur_kernel_is_ten_percent_of_the_side():
    assert SSLViewU8(224).blur_kernel == 23
    assert SSLViewU8(32).blur_kernel == 3


def test_recipes_simclr_symmetric_byol_asymmetric():
    simclr = ssl_view_pair(32, "simclr")
    assert [(v.blur_p, v.solarize_p) for v in simclr] == [(0.5, 0.0), (0.5, 0.0)]
    byol = ssl_view_pair(32, "byol")
    assert [(v.blur_p, v.solarize_p) for v in byol] == [(1.0, 0.0), (0.1, 0.2)]
    custom = ssl_view_pair(32, "byol", blur_p=[0.3, 0.4], solarize_p=[0.0, 0.0])
    assert [(v.blur_p, v.solarize_p) for v in custom] == [(0.3, 0.0), (0.4, 0.0)]
    assert simclr[0].crop.scale == (0.08, 1.0) and simclr[0].flip_p == 0.5 and simclr[0].grayscale_p == 0.2
    assert simclr[0].jitter.brightness == (0.6, 1.4) and simclr[0].jitter.hue == (-0.1, 0.1)
    with pytest.raises(ValueError, match="unknown view recipe"):
        ssl_view_pair(32, "moco")


def test_loader_yields_two_normalised_views_per_image(tmp_path, kit):
    pattern, _ = kit.write_dataset(tmp_path, 1, 8)
    cfg = kit.data_config(pattern)
    loader = build_train_loader(cfg, None, batch_size=4, seed=0, view_transforms=ssl_view_pair(16), pixel_values=False)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"keys", "views"}
        assert [v.shape for v in batch["views"]] == [(4, 3, 16, 16)] * 2 and batch["views"][0].dtype == torch.float32
        assert not torch.equal(batch["views"][0], batch["views"][1])
    again = list(build_train_loader(cfg, None, batch_size=4, seed=0, view_transforms=ssl_view_pair(16), pixel_values=False))
    assert all(torch.equal(a["views"][1], b["views"][1]) for a, b in zip(batches, again))  # seeded: resumable
