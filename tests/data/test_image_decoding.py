import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.data.decode import BadSample
from mmcl.data.samples import decode_image_tensor


def encode(image, fmt, **kw):
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def grey_ramp(width=20, height=12):
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def test_rgb_jpeg_fast_path_equals_pil():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)), "JPEG", quality=90)
    got = decode_image_tensor(data, 10_000)
    reference = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and torch.equal(got, reference)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("L", "PNG"), ("RGB", "WEBP"), ("RGB", "PNG")])
def test_grey_and_other_formats_become_rgb(mode, fmt):
    image = Image.fromarray(grey_ramp(), "L").convert(mode)
    got = decode_image_tensor(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})), 10_000)
    assert got.shape == (3, 12, 20) and got.dtype == torch.uint8
    if fmt != "JPEG":
        assert torch.equal(got[0], torch.from_numpy(grey_ramp())) and torch.equal(got[0], got[2])


def test_sixteen_bit_grey_is_scaled_not_clipped():
    array = (np.tile(np.linspace(0, 65535, 20), (12, 1))).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    got = decode_image_tensor(encode(image, "PNG"), 10_000)
    assert got.shape == (3, 12, 20)
    assert got[0, 0, 0].item() == 0 and got[0, 0, -1].item() == 255 and 120 <= got[0, 0, 10].item() <= 140


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (20, 12), (0, 255, 255, 0))  # pure red in CMYK
    got = decode_image_tensor(encode(image, "JPEG", quality=95), 10_000)
    assert got.shape == (3, 12, 20)
    r, g, b = (got[c].float().mean().item() for c in range(3))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_and_alpha_composite_on_white():
    palette = Image.new("P", (20, 12), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 10, 12))
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    got = decode_image_tensor(encode(palette, "PNG", transparency=0), 10_000)
    assert got.shape == (3, 12, 20)
    assert got[:, 0, 0].tolist() == [10, 200, 30] and got[:, 0, 15].tolist() == [255, 255, 255]

    rgba = Image.new("RGBA", (20, 12), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 12))
    got = decode_image_tensor(encode(rgba, "PNG"), 10_000)
    assert got[:, 0, 0].tolist() == [0, 0, 255] and got[:, 0, 15].tolist() == [255, 255, 255]

    la = Image.new("LA", (20, 12), (0, 0))
    la.paste((50, 255), (0, 0, 10, 12))
    got = decode_image_tensor(encode(la, "PNG"), 10_000)
    assert got[:, 0, 0].tolist() == [50, 50, 50] and got[:, 0, 15].tolist() == [255, 255, 255]

    webp = decode_image_tensor(encode(rgba, "WEBP", lossless=True), 10_000)
    assert webp.shape == (3, 12, 20) and webp[:, 0, 15].tolist() == [255, 255, 255]


def test_reduced_size_jpeg_decoding_when_allowed():
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)), "JPEG")
    assert decode_image_tensor(data, 10**6, lambda w, h: 1).shape == (3, 100, 130)
    assert decode_image_tensor(data, 10**6, lambda w, h: 2).shape == (3, 50, 65)
    assert decode_image_tensor(data, 10**6, lambda w, h: 5).shape == (3, 25, 33)  # 4 is the largest step <= 5
    png = encode(Image.fromarray(rng.integers(0, 256, (100, 130, 3), dtype=np.uint8)), "PNG")
    assert decode_image_tensor(png, 10**6, lambda w, h: 4).shape == (3, 100, 130)


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xd8\xff\xe0" + b"garbage" * 50, "corrupt_image"),
    (b"", "corrupt_image"),
    (b"not an image", "corrupt_image"),
])
def test_corrupt_bytes_raise_bad_sample(data, reason):
    with pytest.raises(BadSample) as error:
        decode_image_tensor(data, 10_000)
    assert error.value.reason == reason


def test_truncated_images_and_pixel_limit():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = encode(image, fmt)
        with pytest.raises(BadSample) as error:
            decode_image_tensor(data[: len(data) // 2], 10_000)
        assert error.value.reason == "corrupt_image"
        with pytest.raises(BadSample) as error:
            decode_image_tensor(data, 40 * 50 - 1)
        assert error.value.reason == "image_too_large"
        assert decode_image_tensor(data, 40 * 50).shape == (3, 40, 50)
