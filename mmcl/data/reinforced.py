"""Reinforced data (`distill.store`): each sample's stored crops and teacher features, replayed.

A store (written by `mmcl curate reinforce`, format in docs/guides/curation.md) holds per sample
K crop boxes and flips, each teacher's image embedding of every crop and its text embedding of
the first caption, in one Parquet part per shard: `DIR/parts/<i:05d>-<stem>.parquet`, `i` the
shard's position in the manifest's shard list (`DIR/mmcl_curate.json`).

    store = ReinforcedStore.open(folder, seed=cfg.seed, image_size=cfg.data.image_size)
    found = store.lookup(raw_sample, epoch)    # Reinforcement, or BadSample("not_in_store")
    pixels = store.replay(image, found)        # uint8 [3, H, W] -> uint8 [3, S, S]

In epoch `e` a sample uses augmentation `k = derive_seed(seed, "augmentation", e, key) % K`,
so every choice is a function of (seed, epoch, key): exact and elastic resume hold, and the
crop rotates over the stored ones from epoch to epoch. Its box is stored as fractions of the
decoded image, so the crop is the same region whatever resolution the decoder gave (JPEG DCT
reduction, `max_reduction`); it is resized to `image_size` as `RandomResizedCropU8` does
(bicubic, antialiased) and flipped if stored so.

A data worker finds a sample's row by its shard (the training URL, redacted, in the manifest's
list; else its file name when that is unique there) and its index in the shard, and checks the
key; a shard's part is read when the stream first needs it and kept among the last
`PARTS_KEPT` parts used. A sample without a row (its shard not in the store, its part not
written, a part that cannot be read, or another key at its index) is skipped and counted as
`not_in_store`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from ..redact import redact
from .decode import BadSample
from .shards import derive_seed

log = logging.getLogger(__name__)

SKIP_REASON = "not_in_store"
MANIFEST = "mmcl_curate.json"
PARTS_KEPT = 4  # parts held per worker: the shuffle buffer mixes samples of a few consecutive shards
RATIO = (3 / 4, 4 / 3)  # the aspect-ratio range the boxes were drawn with (torchvision's default)


class StoreError(ValueError):
    """distill.store cannot be used; the message is one sentence."""


@dataclass(frozen=True)
class Reinforcement:
    """One sample's augmentation for this epoch: its box, flip and the teachers' features of it."""

    augmentation: int  # k, in [0, K)
    box: tuple[float, float, float, float]  # top, left, height, width: fractions of the decoded image
    flip: bool  # horizontal flip after the crop
    image_features: tuple[np.ndarray, ...]  # per teacher: [D_t] float16, its embedding of this crop
    text_features: tuple[np.ndarray, ...]  # per teacher: [D_t] float16, its embedding of the first caption


@dataclass
class _Part:
    """One shard's rows, as arrays (`index -> row` to find them)."""

    rows: dict[int, int]
    keys: list[str]
    boxes: np.ndarray  # [N, K, 4] float32
    flips: np.ndarray  # [N, K] bool
    images: list[np.ndarray]  # per teacher [N, K, D_t] float16
    texts: list[np.ndarray]  # per teacher [N, D_t] float16


def store_fingerprint(manifest: dict) -> str:
    """What the stored features depend on (teachers, augmentations, their seed and scale), as a hex SHA-256."""
    import hashlib

    identity = {key: manifest.get(key) for key in ("version", "augmentations", "seed", "crop_scale", "teachers")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict:
    """A store's manifest; StoreError when the folder is not a store of this version."""
    path = Path(folder).expanduser() / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise StoreError(f"distill.store '{folder}' is not a reinforced store (no readable {MANIFEST}); write one with "
                         "mmcl curate reinforce --out DIR.") from None
    if not isinstance(manifest, dict) or manifest.get("command") != "reinforce" or manifest.get("version") != 1:
        raise StoreError(f"distill.store '{folder}' is not a version-1 reinforced store ({MANIFEST} says command "
                         f"{manifest.get('command') if isinstance(manifest, dict) else None!r}); write it with "
                         "mmcl curate reinforce.")
    try:
        teachers = manifest["teachers"]
        K = int(manifest["augmentations"])
        ok = K >= 1 and len(teachers) >= 1 and all(int(t["embedding_dim"]) >= 1 and float(t["logit_scale"]) > 0
                                                   for t in teachers) and len(manifest["crop_scale"]) == 2
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise StoreError(f"distill.store '{folder}': its {MANIFEST} lacks augmentations, crop_scale or the teachers' "
                         "embedding_dim and logit_scale; write the store again with mmcl curate reinforce.")
    return manifest


def replay_crop(image: Tensor, box: tuple[float, float, float, float], flip: bool, size: int) -> Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size]: the box (fractions of H and W) cropped, resized as
    `RandomResizedCropU8` resizes (bicubic, antialiased), flipped horizontally when `flip`."""
    _, height, width = image.shape
    top = min(int(round(float(box[0]) * height)), height - 1)
    left = min(int(round(float(box[1]) * width)), width - 1)
    crop_height = max(1, min(int(round(float(box[2]) * height)), height - top))
    crop_width = max(1, min(int(round(float(box[3]) * width)), width - left))
    out = F.resized_crop(image, top, left, crop_height, crop_width, [size, size],
                         interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return F.horizontal_flip(out) if flip else out


class ReinforcedStore:
    """A store read by the data workers (see the module docstring); picklable, parts loaded lazily."""

    def __init__(self, folder: str | os.PathLike, manifest: dict, seed: int, image_size: int):
        self.folder = Path(folder).expanduser()
        self.manifest = manifest
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.augmentations = int(manifest["augmentations"])
        self.crop_scale = (float(manifest["crop_scale"][0]), float(manifest["crop_scale"][1]))
        self.teachers = [dict(t) for t in manifest["teachers"]]
        shards = [str(url) for url in manifest.get("shards", [])]
        self._by_url = {url: i for i, url in enumerate(shards)}
        names: dict[str, list[int]] = {}
        for i, url in enumerate(shards):
            names.setdefault(_file_name(url), []).append(i)
        self._by_name = {name: found[0] for name, found in names.items() if len(found) == 1}
        self._reset()

    @classmethod
    def open(cls, folder: str | os.PathLike, seed: int, image_size: int) -> ReinforcedStore:
        return cls(folder, read_manifest(folder), seed, image_size)

    def _reset(self) -> None:
        self._shard_of: dict[str, int | None] = {}  # training URL -> its shard's position in the store
        self._parts: OrderedDict[int, _Part | None] = OrderedDict()
        self.parts_read = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_shard_of={}, _parts=OrderedDict(), parts_read=0)  # each worker reads its own parts
        return state

    # ------------------------------------------------------------------ choices

    def augmentation(self, epoch: int, key: str) -> int:
        """k for `key` in `epoch`: derive_seed(seed, "augmentation", epoch, key) % K."""
        return derive_seed(self.seed, "augmentation", int(epoch), str(key)) % self.augmentations

    def lookup(self, raw: dict[str, Any], epoch: int) -> Reinforcement:
        """This epoch's stored augmentation of a raw sample (`__url__`, `__index__`, `__key__`);
        raises BadSample("not_in_store") when the store has no row for it."""
        key = str(raw["__key__"])
        part = self._part(self._shard(raw["__url__"]))
        row = part.rows.get(int(raw["__index__"])) if part is not None else None
        if row is None or part.keys[row] != key:
            raise BadSample(SKIP_REASON, f"{key} (sample {raw['__index__']} of {redact(raw['__url__'])})")
        k = self.augmentation(epoch, key)
        box = tuple(float(v) for v in part.boxes[row, k])
        return Reinforcement(k, box, bool(part.flips[row, k]),  # type: ignore[arg-type]
                             tuple(images[row, k] for images in part.images), tuple(texts[row] for texts in part.texts))

    def replay(self, image: Tensor, found: Reinforcement) -> Tensor:
        """The student's view: `found`'s crop of the decoded image at `image_size`."""
        return replay_crop(image, found.box, found.flip, self.image_size)

    def max_reduction(self, width: int, height: int) -> int:
        """How much the decoder may shrink an image and still give every stored box >= image_size px a
        side (as `RandomResizedCropU8.max_reduction`, with the store's crop scale)."""
        shortest_ratio = min(RATIO[0], 1 / RATIO[1])
        side = min(math.sqrt(self.crop_scale[0] * width * height * shortest_ratio), width, height)
        return max(1, int(side // self.image_size))

    # ------------------------------------------------------------------ parts

    def _shard(self, url: str) -> int | None:
        if url not in self._shard_of:
            found = self._by_url.get(redact(url))
            self._shard_of[url] = found if found is not None else self._by_name.get(_file_name(url))
        return self._shard_of[url]

    def _part(self, shard: int | None) -> _Part | None:
        if shard is None:
            return None
        if shard in self._parts:
            self._parts.move_to_end(shard)
            return self._parts[shard]
        part = self._read_part(shard)
        self._parts[shard] = part
        while len(self._parts) > PARTS_KEPT:
            self._parts.popitem(last=False)
        return part

    def part_path(self, shard: int) -> Path | None:
        """The part of the shard at position `shard` in the manifest, or None when it is not written."""
        found = sorted((self.folder / "parts").glob(f"{shard:05d}-*.parquet"))
        return found[0] if found else None

    def _read_part(self, shard: int) -> _Part | None:
        path = self.part_path(shard)
        if path is None:
            return None
        self.parts_read += 1
        try:
            return self._arrays(path)
        except Exception as error:  # a damaged part: its samples are skipped (not_in_store), training goes on
            log.warning("distill.store: cannot read %s (%s: %s); its samples are skipped as not_in_store",
                        path, type(error).__name__, error)
            return None

    def _arrays(self, path: Path) -> _Part:
        import pyarrow.parquet as pq

        T, K = len(self.teachers), self.augmentations
        names = ["key", "index", "boxes", "flips"] + [f"image_embedding_{t}" for t in range(T)] + [
            f"text_embedding_{t}" for t in range(T)]
        table = pq.read_table(path, columns=names)
        n = table.num_rows

        def values(name: str, dtype, width: int) -> np.ndarray:
            column = table.column(name).combine_chunks()
            flat = column.flatten().to_numpy(zero_copy_only=False)
            if len(flat) != n * width:
                raise ValueError(f"column {name} holds {len(flat)} values for {n} rows of {width}")
            return np.ascontiguousarray(flat.astype(dtype, copy=False).reshape(n, width))

        indices = table.column("index").to_numpy().astype(np.int64)
        images = [values(f"image_embedding_{t}", np.float16, K * int(d["embedding_dim"])).reshape(n, K, -1)
                  for t, d in enumerate(self.teachers)]
        texts = [values(f"text_embedding_{t}", np.float16, int(d["embedding_dim"])) for t, d in enumerate(self.teachers)]
        return _Part(dict(zip(indices.tolist(), range(n))), [str(k) for k in table.column("key").to_pylist()],
                     values("boxes", np.float32, 4 * K).reshape(n, K, 4), values("flips", np.bool_, K), images, texts)


def _file_name(url: str) -> str:
    """A shard URL's last path part (query dropped): '.../00003.tar?sig=x' -> '00003.tar'."""
    return str(url).split("?", 1)[0].rstrip("/").rpartition("/")[2]
