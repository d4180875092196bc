"""Safe decoding of one sample's image and caption bytes.

Every failure raises `BadSample` with a short machine-readable `reason`, so pipelines can
skip the sample and count it by reason instead of crashing.
"""
from __future__ import annotations

import io
import json
import random
import warnings

from PIL import Image

# Decompression-bomb guard: 89.5 Mpx is PIL's own default warning threshold.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of the skip-count keys."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to an RGB PIL image.

    Handles grayscale, 16-bit, CMYK, palette and alpha images (alpha is composited on white).
    `draft_size` lets JPEG decoding use PIL's reduced-size DCT when the caller only needs an
    image at least that large. Raises `BadSample("image_too_large")` above `max_pixels` and
    `BadSample("corrupt_image")` for anything PIL cannot fully decode.
    """
    if not data:
        raise BadSample("corrupt_image", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadSample("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample("image_too_large", str(error)) from error
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the maximum of the type, not by clipping.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255.0).round().astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_caption(data: bytes | str, rng: random.Random | None = None) -> str:
    """Decode caption bytes (UTF-8) to text.

    A JSON list of strings (several captions per image) yields one of them, chosen by `rng`
    (the first when `rng` is None). Raises `BadSample("bad_caption_encoding")` for non-UTF-8
    bytes and `BadSample("empty_caption")` for a caption that is empty after stripping.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample("bad_caption_encoding", str(error)) from error
    else:
        text = data
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            captions = [c for c in json.loads(stripped) if isinstance(c, str) and c.strip()]
        except json.JSONDecodeError:
            captions = None
        if captions is not None:
            if not captions:
                raise BadSample("empty_caption", "empty caption list")
            stripped = (rng.choice(captions) if rng is not None else captions[0]).strip()
    if not stripped:
        raise BadSample("empty_caption")
    return stripped
