"""One input sample on its way into a shard: read, validate, resize and encode it.

Sources yield `SourceItem`s (image bytes or a path, captions, optional label). `prepare_sample`
turns one into a `PreparedSample` (final image bytes and metadata) or a `Failure` with a short
reason. It is a pure function of its inputs, so it can run in worker processes and the
output stays byte-identical whatever the number of workers.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

from mmcl.data.decode import BadSample, decode_image

from .errors import DataToolsError

RESIZE_MODES = ("none", "shorter", "center_crop")
OUTPUT_FORMATS = ("keep", "jpg", "png", "webp")

# PIL format name -> file extension written into the shard, for formats stored as they are.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True)
class SourceItem:
    """One input as a source yields it, before any file is read or image decoded.

    `source` names the input in metadata and failure lists (a relative path, a table row,
    a dataset index). Exactly one of `image` / `image_path` is normally set; a source that
    already knows the input is unusable sets `error` (a reason) and `detail` instead.
    """

    source: str
    image: bytes | None = None
    image_path: str | None = None
    captions: tuple[str, ...] = ()
    label: int | None = None
    error: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: resize mode, target size, output format and JPEG/WebP quality.

    `resize_mode`: "none" keeps the image size; "shorter" scales the shorter side to
    `image_size` keeping the aspect ratio; "center_crop" does that then crops the centre
    `image_size` x `image_size`. `output_format` "keep" stores the original bytes unless the
    image is resized or in a format other than JPEG/PNG/WebP (then re-encodes it, as JPEG
    for foreign formats). `require_caption`: inputs without a non-empty caption fail.
    """

    resize_mode: str = "none"
    image_size: int | None = None
    output_format: str = "keep"
    quality: int = 95
    require_caption: bool = True

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise DataToolsError(f"resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}.")
        if self.output_format not in OUTPUT_FORMATS:
            raise DataToolsError(f"output format {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}.")
        if self.resize_mode != "none" and (self.image_size is None or self.image_size < 1):
            raise DataToolsError(f"resize mode {self.resize_mode!r} needs a positive image size (--image-size N).")
        if self.resize_mode == "none" and self.image_size is not None:
            raise DataToolsError(
                "an image size was given without a resize mode; add --resize-mode shorter or center_crop."
            )
        if not 1 <= self.quality <= 100:
            raise DataToolsError(f"quality must be between 1 and 100, got {self.quality}.")


@dataclass
class PreparedSample:
    """A sample ready to be written: final image bytes, its extension, captions and metadata."""

    source: str
    image: bytes
    ext: str
    captions: list[str]
    label: int | None
    width: int
    height: int
    original_width: int
    original_height: int


@dataclass
class Failure:
    """An input that was not written; `reason` is a short key (e.g. "corrupt_image")."""

    source: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


def clean_captions(captions: tuple[str, ...] | list[str]) -> list[str]:
    """Strip captions and drop empty ones."""
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def prepare_sample(item: SourceItem, options: ImageOptions) -> PreparedSample | Failure:
    """Read, decode, optionally resize and re-encode one input; never raises for bad data."""
    if item.error is not None:
        return Failure(item.source, item.error, item.detail)
    captions = clean_captions(item.captions)
    if options.require_caption and not captions:
        return Failure(item.source, "empty_caption", "no non-empty caption")
    data = item.image
    if data is None:
        if item.image_path is None:
            return Failure(item.source, "missing_image", "no image bytes or path")
        try:
            with open(item.image_path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return Failure(item.source, "missing_file", f"{item.image_path} does not exist")
        except OSError as error:
            return Failure(item.source, "unreadable_file", f"{type(error).__name__}: {error}")
    resized = options.resize_mode != "none"
    fmt, original_size = _probe(data)
    try:
        # When resizing, JPEGs decode at a reduced DCT scale that still covers the target size.
        image = decode_image(data, draft_size=(options.image_size,) * 2 if resized else None)
    except BadSample as error:
        return Failure(item.source, error.reason, str(error))
    original_width, original_height = original_size or image.size
    source_ext = _KEPT_FORMATS.get(fmt)

    if resized:
        image = resize_image(image, options.resize_mode, options.image_size)
    wanted = options.output_format
    if wanted == "keep":
        wanted = source_ext or "jpg"
    if not resized and wanted == source_ext:
        out, ext = data, source_ext  # stored as given: no generation loss
    else:
        out, ext = encode_image(image, wanted, options.quality), wanted
    return PreparedSample(
        source=item.source,
        image=out,
        ext=ext,
        captions=captions,
        label=item.label,
        width=image.width,
        height=image.height,
        original_width=original_width,
        original_height=original_height,
    )


def resize_image(image: Image.Image, mode: str, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic); "center_crop" then crops a centred square."""
    width, height = image.size
    scale = size / min(width, height)
    # The shorter side lands exactly on `size`; the longer one is rounded.
    new_width = size if width <= height else max(size, round(width * scale))
    new_height = size if height < width else max(size, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    if mode == "center_crop":
        left = (new_width - size) // 2
        top = (new_height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def encode_image(image: Image.Image, ext: str, quality: int = 95) -> bytes:
    """Encode an RGB image as jpg, png or webp bytes (deterministic for fixed inputs)."""
    buffer = io.BytesIO()
    if ext == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=_PIL_FORMATS[ext], quality=quality)
    return buffer.getvalue()


def _probe(data: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """PIL's format name and the stored size of image bytes (reads only the header)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format, image.size
    except Exception:  # not an image: decode_image reports why
        return None, None


def parse_label(value: object) -> int:
    """An integer label from an int, an integral float or a numeric string; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer label")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{value!r} is not an integer label")
