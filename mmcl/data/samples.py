"""From a raw sample (bytes) to tensors, and from a list of samples to a batch.

Order of work per sample, cheapest checks first so bad samples cost little: image present,
caption decoded (UTF-8, one of a JSON list chosen by the sample's seed), label parsed, image
header checked against `max_pixels`, image decoded, transforms applied. A member the tar
reader left unread for its size (`decode.Oversized`) is skipped before any decoding.

Image decoding returns RGB `uint8 [3, H, W]`: plain RGB/grey JPEGs go through
`torchvision.io.decode_jpeg` (libjpeg-turbo straight into a tensor); large JPEGs whose
transforms allow it are decoded at reduced size through PIL's draft mode; everything else
(PNG, WebP, CMYK, palette, alpha, 16-bit, or anything the fast path refuses) goes through
`decode.load_image`, which also classifies failures, and `decode.to_rgb`, a block of rows at
a time so that a 16-bit image costs about its 8-bit RGB size on top of PIL's own copy.
"""
from __future__ import annotations

import io
import logging
import random
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from .class_prompts import ClassPrompts
from .decode import (
    BLOCK_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_TEXT_BYTES,
    IMAGE_EXTENSIONS,
    BadSample,
    caption_list,
    decode_label,
    grey_peak,
    load_image,
    member_bytes,
    to_rgb,
)
from .naflex import Patches, naflex_batch
from .transforms import normalize_uint8

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption_encoding",
    "bad_caption",
    "caption_too_large",
    "bad_label",
    "metadata_too_large",
    "corrupt_image",
    "image_too_large",
    "transform_error",
    "unreadable_shard",
    "truncated_shard",
    "missing_label",
    "not_in_store",
)


@dataclass
class SampleSpec:
    """What to make of each raw sample.

    image_transform: uint8 [3,H,W] -> [3,S,S] for `pixel_values` (None: no pixel_values), or
        -> `naflex.Patches` (NaFlex: variable patch sequences).
    view_transforms: transforms for `views` (e.g. two SimCLR augmentations), or None.
    caption_key: tar extension holding the caption ("txt"); None = image-only, no caption needed.
    all_captions: keep every caption of a JSON list (evaluation) in `captions`.
    teacher_transform: uint8 [3,H,W] -> [3,S_t,S_t] for `teacher_pixel_values` (a distillation
        teacher's own size), applied to the same decoded image with the RNGs re-seeded to the
        sample's seed, so a random crop of the same class and scale picks the student's box.
    max_text_bytes / max_image_bytes: caption and `.cls` members / image members above these
        are not read (the sample is skipped as caption_, metadata_ or image_too_large).
    class_prompts: captions from the `.cls` labels (FLYP) instead of `caption_key`; a sample
        without a label is skipped (missing_label).
    first_caption: caption a JSON list by its first entry instead of a seeded choice (scoring).
    indices: carry each sample's position in its shard (`__index__`) into the batch as `indices`.
    keyed_transform: `image_transform(image, key)`: its random choices follow the sample's key, not
        the stream position (augmentations stored per sample, `mmcl curate reinforce`).
    store: a reinforced store (`reinforced.ReinforcedStore`, `distill.store`): the image becomes
        this epoch's stored crop (replayed, instead of `image_transform`), the caption the first
        one (the one the teachers embedded), and the sample carries the teachers' stored features;
        a sample without a row is skipped (not_in_store).
    """

    image_transform: Callable[[Tensor], Tensor] | None
    view_transforms: Sequence[Callable[[Tensor], Tensor]] | None = None
    caption_key: str | None = "txt"
    max_pixels: int = DEFAULT_MAX_PIXELS
    all_captions: bool = False
    teacher_transform: Callable[[Tensor], Tensor] | None = None
    class_prompts: ClassPrompts | None = None
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    first_caption: bool = False
    indices: bool = False
    keyed_transform: bool = False
    store: Any = None

    def member_limit(self, extension: str) -> int | None:
        """Bytes the tar reader may read of a member with this extension; None: not needed, not read."""
        if extension in IMAGE_EXTENSIONS:
            return self.max_image_bytes
        if extension == "cls" or extension == self.caption_key:
            return self.max_text_bytes
        return None


@dataclass
class Sample:
    key: str
    image: Tensor | Patches | None
    views: list[Tensor] | None
    caption: str | None
    captions: list[str] | None
    label: int | None
    teacher_image: Tensor | None = None
    index: int | None = None  # position in its shard (SampleSpec.indices)
    reinforcement: Any = None  # reinforced.Reinforcement: the stored crop and teachers' features (distill.store)


@contextmanager
def seeded_rngs(seed: int, restore: bool):
    """Seed torch's CPU generator and `random` for one sample; restore them afterwards when
    `restore` (in the main process, so the trainer's own RNG streams are left untouched)."""
    if restore:
        torch_state, py_state = torch.default_generator.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if restore:
            torch.default_generator.set_state(torch_state)
            random.setstate(py_state)


def _transforms(spec: SampleSpec) -> list[Callable]:
    found = [spec.image_transform] if spec.image_transform is not None else []
    teacher = [spec.teacher_transform] if spec.teacher_transform is not None else []
    store = [spec.store] if spec.store is not None else []  # it says how far the decoder may shrink too
    return found + list(spec.view_transforms or []) + teacher + store


def decode_image_tensor(
    data: bytes, max_pixels: int, max_reduction: Callable[[int, int], int] | None = None
) -> Tensor:
    """Image bytes -> RGB uint8 [3, H', W'].

    [H', W'] is the full size, or ceil(H/k), ceil(W/k) for a JPEG when
    `max_reduction(W, H) >= k`, k in 2, 4, 8. Raises `BadSample` like `decode.load_image`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
        width, height = header.size
        fmt, mode = header.format, header.mode
    except Image.DecompressionBombError as error:
        raise BadSample("image_too_large", str(error)) from error
    except Exception as error:
        raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error
    if width * height > max_pixels:
        raise BadSample("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    allowed = max_reduction(width, height) if max_reduction is not None and fmt == "JPEG" else 1
    factor = 8 if allowed >= 8 else 4 if allowed >= 4 else 2 if allowed >= 2 else 1
    if fmt == "JPEG" and factor > 1:
        return _rgb_tensor(load_image(data, max_pixels, draft_size=(width // factor, height // factor)))
    # The EOI check keeps truncated files away from libjpeg, which would pad them with grey.
    if fmt == "JPEG" and mode in ("RGB", "L") and data[-2:] == b"\xff\xd9":
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # let PIL decide (and classify the failure)
    return _rgb_tensor(load_image(data, max_pixels))


def _rgb_tensor(image: Image.Image) -> Tensor:
    """Any loaded PIL image -> RGB uint8 [3, H, W] (`decode.to_rgb`), converted a block of rows
    at a time: the peak is the source image plus the output, whatever the mode or bit depth."""
    try:
        width, height = image.size
        out = torch.empty((3, height, width), dtype=torch.uint8)
        peak = grey_peak(image)
        rows = max(1, BLOCK_PIXELS // max(1, width))
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            block = image if (top, bottom) == (0, height) else image.crop((0, top, width, bottom))
            array = np.array(to_rgb(block, peak), dtype=np.uint8)  # [rows, W, 3]
            out[:, top:bottom].copy_(torch.from_numpy(array).permute(2, 0, 1))
        return out
    except Exception as error:
        raise BadSample("corrupt_image", f"{type(error).__name__}: {error}") from error


def decode_sample(raw: dict[str, Any], spec: SampleSpec, seed: int, restore_rng: bool, epoch: int = 0) -> Sample:
    """Raw sample -> Sample, or raise `BadSample(reason)`. `seed` drives caption choice and augmentation;
    `epoch` the choice of a class prompt (with `spec.class_prompts`).

    Whatever the bytes hold, only `BadSample` comes out: each step turns any other exception
    into its own reason (bad_caption, bad_label, corrupt_image, transform_error).
    """
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise BadSample("missing_image")
    caption = captions = None
    if spec.caption_key is not None:
        if spec.caption_key not in raw:
            raise BadSample("missing_caption")
        found = _stage("bad_caption", caption_list, member_bytes(raw[spec.caption_key], spec.caption_key, spec.caption_key))
        # the first caption when scoring, and with a store (the one the teachers' text features are of)
        caption = found[0] if spec.first_caption or spec.store is not None else random.Random(seed).choice(found)
        captions = found if spec.all_captions else None
    label = None
    if "cls" in raw:
        label = decode_label(member_bytes(raw["cls"], "cls", spec.caption_key))
    if spec.class_prompts is not None:
        if label is None:
            raise BadSample("missing_label")
        caption = spec.class_prompts.caption(label, str(raw["__key__"]), epoch)
    reinforcement = spec.store.lookup(raw, epoch) if spec.store is not None else None  # before decoding: cheap
    image_bytes = member_bytes(raw[image_ext], image_ext, spec.caption_key)
    image = _stage("corrupt_image", decode_image_tensor, image_bytes, spec.max_pixels,
                   _reduction_fn(_transforms(spec)))
    with seeded_rngs(seed, restore_rng):
        try:
            if reinforcement is not None:
                main = spec.store.replay(image, reinforcement)
            elif spec.image_transform is None:
                main = None
            elif spec.keyed_transform:
                main = spec.image_transform(image, str(raw["__key__"]))
            else:
                main = spec.image_transform(image)
            views = [t(image) for t in spec.view_transforms] if spec.view_transforms else None
        except Exception as error:
            _log_first_transform_error(error)
            raise BadSample("transform_error", f"{type(error).__name__}: {error}") from error
    teacher = None
    if spec.teacher_transform is not None:
        with seeded_rngs(seed, restore_rng):  # the same draws as the student's transform made first
            try:
                teacher = spec.teacher_transform(image)
            except Exception as error:
                _log_first_transform_error(error)
                raise BadSample("transform_error", f"{type(error).__name__}: {error}") from error
    index = int(raw["__index__"]) if spec.indices else None
    return Sample(str(raw["__key__"]), main, views, caption, captions, label, teacher, index, reinforcement)


def _stage(reason: str, step: Callable[..., Any], *args: Any) -> Any:
    """`step(*args)`, with any exception but `BadSample` turned into `BadSample(reason)`."""
    try:
        return step(*args)
    except BadSample:
        raise
    except Exception as error:  # a decoder failure nobody classified: still just this sample's
        raise BadSample(reason, f"{type(error).__name__}: {error}") from error


_transform_error_logged = False


def _log_first_transform_error(error: Exception) -> None:
    # Skipped like any bad sample, but a transform that fails on everything is a bug: show it once.
    global _transform_error_logged
    if not _transform_error_logged:
        _transform_error_logged = True
        log.warning("an image transform failed; skipping such samples (counted as transform_error)", exc_info=error)


def _reduction_fn(transforms: list[Callable]) -> Callable[[int, int], int] | None:
    """How much every transform lets the decoder shrink a (W, H) image; None if one cannot say."""
    fns = [getattr(t, "max_reduction", None) for t in transforms]
    if not fns or any(fn is None for fn in fns):
        return None
    return lambda width, height: min(fn(width, height) for fn in fns)


def _stack(tensors: list[Tensor], in_worker: bool) -> Tensor:
    """Stack per-sample images; uint8 stays uint8, float goes to shared memory in a worker."""
    first = tensors[0]
    if first.dtype == torch.uint8 or not in_worker:
        return torch.stack(tensors)
    return torch.stack(tensors, out=_shared_empty((len(tensors), *first.shape), first.dtype))


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    # Like default_collate: allocate in shared memory so sending it to the main process is free.
    try:
        numel = int(np.prod(shape))
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0, dtype=dtype).new(storage).view(shape)
    except (AttributeError, RuntimeError):  # private API moved: the DataLoader copies to shared memory itself
        return torch.empty(shape, dtype=dtype)


def _images(tensors: list[Tensor], mean: Sequence[float], std: Sequence[float], in_worker: bool) -> Tensor:
    stacked = _stack(tensors, in_worker)
    if stacked.dtype != torch.uint8:
        return stacked.float()
    out = _shared_empty(tuple(stacked.shape), torch.float32) if in_worker else None
    return normalize_uint8(stacked, mean, std, out=out)


def _image_inputs(prefix: str, images: list[Any], mean: Sequence[float], std: Sequence[float],
                  in_worker: bool) -> dict[str, Tensor]:
    """`{prefix}pixel_values` [B,3,S,S]; NaFlex `Patches` give `{prefix}pixel_values` [B,L,3*P*P],
    `{prefix}pixel_attention_mask` [B,L] and `{prefix}spatial_shapes` [B,2] (`naflex.naflex_batch`)."""
    if isinstance(images[0], Patches):
        empty = _shared_empty if in_worker else None
        return {prefix + key: value for key, value in naflex_batch(images, mean, std, empty).items()}
    return {prefix + "pixel_values": _images(images, mean, std, in_worker)}


def collate(
    samples: list[Sample],
    tokenize: Callable[[list[str]], tuple[Tensor, Tensor]] | None,
    mean: Sequence[float],
    std: Sequence[float],
    teacher_tokenize: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None,
    teacher_mean: Sequence[float] | None = None,
    teacher_std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Samples -> batch dict.

    pixel_values [B,3,S,S] float (when an image transform is set; with a NaFlex transform
    pixel_values [B,L,3*P*P] float, pixel_attention_mask [B,L] int32, spatial_shapes [B,2] long), views: list of [B,3,S,S]
    float (when view transforms are set), input_ids / attention_mask [B,L] long (when captions
    are read), labels [B] long (when any sample has `.cls`; -1 where missing), keys: list[str],
    indices: list[int] (each sample's position in its shard, with SampleSpec.indices),
    captions: list[list[str]] (evaluation with all captions). With a distillation teacher:
    teacher_pixel_values [B,3,S_t,S_t] float (normalised with teacher_mean/std) and
    teacher_input_ids / teacher_attention_mask [B,L_t] long (the teacher's tokenizer). With a
    reinforced store: teacher_image_features_<t> / teacher_text_features_<t> [B, D_t] float32
    per teacher t (its stored float16 features of each sample's crop and first caption).
    """
    in_worker = get_worker_info() is not None
    batch: dict[str, Any] = {"keys": [s.key for s in samples]}
    if samples[0].index is not None:
        batch["indices"] = [s.index for s in samples]
    if samples[0].image is not None:
        batch.update(_image_inputs("", [s.image for s in samples], mean, std, in_worker))
    if samples[0].views is not None:
        batch["views"] = [
            _images([s.views[v] for s in samples], mean, std, in_worker) for v in range(len(samples[0].views))
        ]
    if tokenize is not None and samples[0].caption is not None:
        batch["input_ids"], batch["attention_mask"] = tokenize([s.caption for s in samples])
    if samples[0].teacher_image is not None:
        batch.update(_image_inputs("teacher_", [s.teacher_image for s in samples], teacher_mean or mean,
                                   teacher_std or std, in_worker))
    if teacher_tokenize is not None and samples[0].caption is not None:
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = teacher_tokenize([s.caption for s in samples])
    if samples[0].reinforcement is not None:
        for t in range(len(samples[0].reinforcement.image_features)):
            for kind in ("image", "text"):
                rows = np.stack([getattr(s.reinforcement, f"{kind}_features")[t] for s in samples])
                batch[f"teacher_{kind}_features_{t}"] = torch.from_numpy(rows).float()
    if any(s.label is not None for s in samples):
        batch["labels"] = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    if samples[0].captions is not None:
        batch["captions"] = [s.captions for s in samples]
    return batch
