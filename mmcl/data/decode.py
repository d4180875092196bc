"""Safe decoding of one sample's members: image, caption, label and JSON metadata.

Every failure raises `BadSample` with a short machine-readable `reason`, so pipelines can
skip the sample and count it by reason instead of crashing: nothing a sample's bytes hold
(deeply nested JSON, huge integers, truncated or exotic images) escapes as another exception.
What one sample may cost is bounded: members above a byte limit are not read at all (see
`stream.iter_tar_samples`, which leaves an `Oversized` marker), and images are converted to
8-bit RGB in row blocks, so a 16-bit image costs little more than its 8-bit RGB size.
"""
from __future__ import annotations

import io
import json
import random
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

# Decompression-bomb guard: 89.5 Mpx is PIL's own default warning threshold.
DEFAULT_MAX_PIXELS = 89_478_485
# Caption, .cls and .json members above this are skipped unread: real ones are a few hundred bytes.
DEFAULT_MAX_TEXT_BYTES = 64 * 1024
# Image members above this are skipped unread: 256 MiB is an 8-bit RGB image of DEFAULT_MAX_PIXELS.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# JSON nested deeper than this is refused before parsing, so the outcome never depends on the
# interpreter's recursion limit (a caption list is flat; metadata is a few levels deep).
MAX_JSON_DEPTH = 64
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')

BLOCK_PIXELS = 1 << 18  # pixels converted at a time: bounds the temporaries of a conversion


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of the skip-count keys."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Oversized(NamedTuple):
    """A tar member above its byte limit, left unread: its size and the limit."""

    size: int
    limit: int


class Unread(NamedTuple):
    """A tar member the reader did not need, left unread: its size."""

    size: int


def too_large_reason(extension: str, caption_key: str | None = "txt") -> str:
    """The skip reason of an `Oversized` member: image_too_large, caption_too_large or metadata_too_large."""
    if extension in IMAGE_EXTENSIONS:
        return "image_too_large"
    return "caption_too_large" if extension == caption_key else "metadata_too_large"


def member_bytes(value: Any, extension: str, caption_key: str | None = "txt") -> bytes:
    """A member's bytes; raises `BadSample(<kind>_too_large)` for an `Oversized` one."""
    if isinstance(value, Oversized):
        raise BadSample(too_large_reason(extension, caption_key), f".{extension} member of {value.size} bytes "
                        f"exceeds the limit of {value.limit}")
    if isinstance(value, Unread):
        raise BadSample("unread_member", f".{extension} member was not read")  # a reader bug, not the data's
    return value


# ---------------------------------------------------------------------------------------- images


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to a loaded PIL image in its own mode (RGB, L, I;16, P, RGBA...).

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
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to an RGB PIL image (see `load_image` and `to_rgb`).

    Handles grayscale, 16-bit, CMYK, palette and alpha images (alpha is composited on white).
    """
    image = load_image(data, max_pixels, draft_size)
    try:
        return to_rgb(image)
    except Exception as error:
        raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error


def to_rgb(image: Image.Image, peak: int | None = None) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white.

    16/32-bit grey (I;16*, I) is scaled to 8 bits by `peak` (default: 65535 when any value
    exceeds 255, else 255), not clipped; pass the whole image's `grey_peak` when converting a crop.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = _scaled_grey(image, peak if peak is not None else grey_peak(image))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def grey_peak(image: Image.Image) -> int | None:
    """The value a 16/32-bit grey image is scaled by (65535 or 255); None for other modes."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return None
    extrema = image.getextrema()
    return 65535 if extrema[1] > 255 else 255


def _scaled_grey(image: Image.Image, peak: int) -> Image.Image:
    """I;16* / I -> L: round(value / peak * 255) in integers, a block of rows at a time (no float64 copy)."""
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, BLOCK_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        block = np.asarray(image.crop((0, top, width, bottom))).astype(np.int32)
        # (v * 255 + peak // 2) // peak == round(v / peak * 255): no ties for peak 255 or 65535
        out[top:bottom] = (np.clip(block, 0, peak) * 255 + peak // 2) // peak
    return Image.fromarray(out)


# ---------------------------------------------------------------------------------------- text


def caption_list(data: bytes | str) -> list[str]:
    """Every caption of a caption member: a JSON list of strings, else the whole text as one.

    Text that looks like a JSON list but is not valid JSON (`[sic] a cat [2019]`) is one
    caption. Raises `BadSample` with `bad_caption_encoding` (not UTF-8), `empty_caption`
    (nothing left after stripping, or a list without a non-empty string) or `bad_caption`
    (JSON nested too deeply or otherwise undecodable).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample("bad_caption_encoding", str(error)) from error
    elif isinstance(data, str):
        text = data
    else:
        raise BadSample("bad_caption", f"a caption of type {type(data).__name__}")
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = load_json(stripped)
        except json.JSONDecodeError:
            parsed = None  # not JSON: the text itself is the caption
        except Exception as error:  # nesting depth, integers of > 4300 digits
            raise BadSample("bad_caption", f"undecodable JSON caption list: {error}") from error
        if isinstance(parsed, list):
            captions = [c.strip() for c in parsed if isinstance(c, str) and c.strip()]
            if not captions:
                raise BadSample("empty_caption", "no caption in the caption list")
            return captions
    if not stripped:
        raise BadSample("empty_caption")
    return [stripped]


def decode_caption(data: bytes | str, rng: random.Random | None = None) -> str:
    """Decode caption bytes (UTF-8) to text.

    A JSON list of strings (several captions per image) yields one of them, chosen by `rng`
    (the first when `rng` is None). Raises `BadSample` as `caption_list` does.
    """
    captions = caption_list(data)
    return rng.choice(captions) if rng is not None else captions[0]


def decode_label(data: bytes) -> int:
    """A `.cls` member: a non-negative integer below 2**63 in ASCII. Raises `BadSample("bad_label")`."""
    try:
        text = bytes(data).decode("ascii").strip()
        if not text.isdigit():
            raise ValueError(f"not a non-negative integer: {text[:20]!r}")
        if len(text) > 19 or int(text) >= 2**63:
            raise ValueError(f"label {text[:20]}... is too large")
        return int(text)
    except Exception as error:  # UnicodeDecodeError, ValueError, a non-bytes value
        raise BadSample("bad_label", str(error)) from error


def decode_metadata(data: bytes) -> Any:
    """A `.json` member parsed. Raises `BadSample("bad_json")` for anything `json` refuses,
    including nesting too deep for the parser."""
    try:
        return load_json(bytes(data).decode("utf-8"))
    except Exception as error:  # JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError, TypeError
        raise BadSample("bad_json", f"{type(error).__name__}: {str(error)[:200]}") from error


def load_json(text: str) -> Any:
    """`json.loads`, refusing (ValueError) nesting deeper than MAX_JSON_DEPTH before parsing.

    The depth is found in one pass over the brackets, quotes and backslashes (linear time).
    """
    depth, in_string, escaped_at = 0, False, -1
    for match in _JSON_SPECIAL.finditer(text):
        at, char = match.start(), match.group()
        if at == escaped_at:
            continue
        if in_string:
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        elif char in "]}":
            depth -= 1
    return json.loads(text)
