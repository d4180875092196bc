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


@pytest.mark.parametrize("peak_value", [65535, 200])
def test_sixteen_bit_grey_is_scaled_exactly_like_the_float_formula_block_by_block(monkeypatch, peak_value):
    import mmcl.data.decode as decode
    import mmcl.data.samples as samples

    monkeypatch.setattr(decode, "BLOCK_PIXELS", 64)  # many blocks of 2-3 rows
    monkeypatch.setattr(samples, "BLOCK_PIXELS", 64)
    array = np.random.default_rng(3).integers(0, peak_value + 1, (23, 29)).astype(np.uint16)
    peak = 65535.0 if array.max() > 255 else 255.0
    expected = (array.astype(np.float64) / peak * 255.0).round().astype(np.uint8)  # the former float64 formula
    got = decode_image_tensor(encode(Image.fromarray(array), "PNG"), 10_000)
    assert got.shape == (3, 23, 29)
    assert np.array_equal(got[0].numpy(), expected) and torch.equal(got[0], got[2])


def test_block_conversion_equals_whole_image_conversion_for_palette_alpha_and_grey(monkeypatch):
    import mmcl.data.samples as samples
    from mmcl.data.decode import to_rgb

    rng = np.random.default_rng(4)
    rgba = Image.fromarray(rng.integers(0, 256, (31, 17, 4), dtype=np.uint8), "RGBA")
    images = [rgba, rgba.convert("LA"), rgba.convert("P"), rgba.convert("L"), rgba.convert("CMYK")]
    for image in images:
        data = encode(image, "JPEG" if image.mode == "CMYK" else "PNG")
        whole = torch.from_numpy(np.array(to_rgb(Image.open(io.BytesIO(data))))).permute(2, 0, 1)
        monkeypatch.setattr(samples, "BLOCK_PIXELS", 40)
        assert torch.equal(decode_image_tensor(data, 10_000), whole), image.mode


def test_a_sixteen_bit_image_costs_about_its_eight_bit_rgb_size():
    """Peak RSS growth of decoding a 4-Mpx 16-bit PNG, in a fresh process (benchmarks/sample_memory.py):
    with float64 conversion it was 10x the 8-bit RGB size; row blocks keep it near 2x."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "sample_memory.py"
    done = subprocess.run([sys.executable, str(script), "--megapixels", "4", "--mode", "gray16", "--json"],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["pixels"] >= 3_900_000 and result["ratio"] < 3.5, result


@pytest.mark.parametrize("data, label", [(b"7", 7), (b" 12\n", 12), (b"0", 0), (b"9223372036854775807", 2**63 - 1)])
def test_labels_are_non_negative_integers(data, label):
    from mmcl.data.decode import decode_label

    assert decode_label(data) == label


@pytest.mark.parametrize("data", [b"-1", b"+3", b"3.5", b"1e3", b"seven", b"", b"\xff", b"9" * 19 + b"0", b"\xd9\xa3"])
def test_labels_that_are_not_non_negative_int64_are_bad(data):
    from mmcl.data.decode import decode_label

    with pytest.raises(BadSample) as error:
        decode_label(data)
    assert error.value.reason == "bad_label"


@pytest.mark.parametrize("caption, outcome", [
    (b"[" * 5000 + b"]" * 5000, "bad_caption"),
    (b'["a cat", ' + b"[" * 65 + b"]" * 65 + b"]", "bad_caption"),  # deeper than MAX_JSON_DEPTH, however the limit
    (b'["a cat", ' + b"[" * 60 + b"]" * 60 + b"]", ["a cat"]),
    (b"[" + b"9" * 5000 + b"]", "bad_caption"),
    (b'["[[[[", "b \\" ]]"]', ["[[[[", 'b " ]]']),
    (b"[sic] a cat [2019]", ["[sic] a cat [2019]"]),
    (b"[1, null, {}]", "empty_caption"),
    (b"[]", "empty_caption"),
    (b"\xff[]", "bad_caption_encoding"),
])
def test_caption_lists_decode_or_fail_with_a_reason(caption, outcome):
    from mmcl.data.decode import caption_list

    if isinstance(outcome, list):
        assert caption_list(caption) == outcome
    else:
        with pytest.raises(BadSample) as error:
            caption_list(caption)
        assert error.value.reason == outcome
