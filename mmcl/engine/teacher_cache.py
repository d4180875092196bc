"""Teacher features on disk, per sample key (images) and per caption's tokens (texts).

    cache = TeacherFeatureCache(cfg.distill.cache_dir, fingerprint, rank)   # refuses a stale cache
    hits = cache.images(keys)             # [B] list of [D_t] tensors or None
    cache.add_images(keys, features)      # remembered now, written by flush()
    cache.flush()                         # this rank's new entries -> one new file; reads the other ranks' files

A multi-epoch run then encodes each sample with the teacher once. The directory holds
`manifest.json` (the fingerprint: teacher weights' SHA-256, its precision, image transform,
normalisation and tokenizer) and `features-*.safetensors` files, each written atomically
(temporary name, then rename) by one rank. A directory whose manifest differs from the run's
fingerprint is refused: its features came from other weights or other inputs.

Images are keyed by the samples' `__key__` (assumed unique over the training data, as
img2dataset's keys are), texts by a hash of the teacher's token ids, so a sample whose
caption is drawn from a list gets the teacher's features of the caption it drew.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class StaleCacheError(ValueError):
    """distill.cache_dir was written for another teacher or transform."""


def token_key(input_ids: Tensor) -> str:
    """A text's cache key: SHA-1 of its token ids (one row [L])."""
    return hashlib.sha1(input_ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


class TeacherFeatureCache:
    """Per-key teacher features of one run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], rank: int = 0):
        self.root = Path(directory).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved != fingerprint:
                changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise StaleCacheError(
                    f"distill.cache_dir '{self.root}' holds features of another teacher or transform (differs in: "
                    f"{', '.join(changed)}); delete it or point distill.cache_dir at a new directory.")
        else:
            temporary = manifest.with_name(f".manifest-{uuid.uuid4().hex}.json")
            temporary.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            os.replace(temporary, manifest)
        self._image: dict[str, Tensor] = {}
        self._text: dict[str, Tensor] = {}
        self._pending: dict[str, Tensor] = {}
        self._read: set[str] = set()
        self.hits = self.misses = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._image) + len(self._text)

    def refresh(self) -> None:
        """Read the feature files not read yet (other ranks', earlier runs')."""
        from safetensors.torch import load_file

        for path in sorted(self.root.glob("features-*.safetensors")):
            if path.name in self._read:
                continue
            for name, tensor in load_file(str(path)).items():
                kind, _, key = name.partition("/")
                (self._image if kind == "image" else self._text)[key] = tensor
            self._read.add(path.name)

    def _lookup(self, table: dict[str, Tensor], keys: list[str]) -> list[Tensor | None]:
        found = [table.get(key) for key in keys]
        hits = sum(f is not None for f in found)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    def images(self, keys: list[str]) -> list[Tensor | None]:
        return self._lookup(self._image, keys)

    def texts(self, keys: list[str]) -> list[Tensor | None]:
        return self._lookup(self._text, keys)

    def add_images(self, keys: list[str], features: Tensor) -> None:
        self._add(self._image, "image", keys, features)

    def add_texts(self, keys: list[str], features: Tensor) -> None:
        self._add(self._text, "text", keys, features)

    def _add(self, table: dict[str, Tensor], kind: str, keys: list[str], features: Tensor) -> None:
        for key, row in zip(keys, features.detach().float().cpu()):
            if key not in table:
                table[key] = row.clone()
                self._pending[f"{kind}/{key}"] = table[key]

    def flush(self) -> None:
        """Write this rank's new entries to a new file (atomically), then read other ranks' new files."""
        from safetensors.torch import save_file

        if self._pending:
            name = f"features-r{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"
            temporary = self.root / f".{name}.tmp"
            save_file(self._pending, str(temporary))
            os.replace(temporary, self.root / name)
            self._read.add(name)
            self._pending = {}
        self.refresh()
