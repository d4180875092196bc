"""Teacher features on disk, per sample key (images) and per caption's tokens (texts).

    cache = TeacherFeatureCache(cfg.distill.cache_dir, fingerprint, rank)   # refuses a stale cache
    hits = cache.images(keys)             # [B] list of [D_t] tensors or None
    cache.add_images(keys, features)      # remembered now, written by flush()
    cache.share()                         # every optimizer step, on every rank: the ranks swap their new entries
    cache.flush()                         # this rank's new entries -> one new file; reads the other ranks' files

A multi-epoch run then encodes each sample with the teacher once, whichever rank meets it:
shard order changes between epochs, so a rank meets samples another rank encoded, and `share`
(an all-gather of the entries added since the last step) has given it them by then; the files
only carry entries from one run (or a resumed one) to the next. The directory holds
`manifest.json` (the fingerprint: teacher weights' SHA-256, its precision, image transform,
normalisation and tokenizer) and `features-*.safetensors` files, each written atomically
(temporary name, fsync, then rename) by one rank; a file found unreadable anyway (a machine
crash) is skipped and counted in `unreadable_files`, its entries encoded again. A directory
whose manifest differs from the run's fingerprint is refused: its features came from other
weights or other inputs.

Images are keyed by the samples' `__key__` (assumed unique over the training data, as
img2dataset's keys are), texts by a hash of the teacher's token ids, so a sample whose
caption is drawn from a list gets the teacher's features of the caption it drew.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


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
        self._pending: dict[str, Tensor] = {}  # this rank's entries not written yet (flush)
        self._unshared: dict[str, Tensor] = {}  # this rank's entries not sent to the other ranks yet (share)
        self._read: set[str] = set()
        self.hits = self.misses = 0
        self.unreadable_files = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._image) + len(self._text)

    def refresh(self) -> None:
        """Read the feature files not read yet (other ranks', earlier runs')."""
        from safetensors.torch import load_file

        for path in sorted(self.root.glob("features-*.safetensors")):
            if path.name in self._read:
                continue
            self._read.add(path.name)
            try:
                entries = load_file(str(path))
            except Exception as error:  # cut short by a crash of the machine: its entries get encoded again
                log.warning("distill.cache_dir: skipping unreadable %s (%s)", path, error)
                self.unreadable_files += 1
                continue
            self._merge(entries)

    def _merge(self, entries: dict[str, Tensor]) -> None:
        # An entry already known wins: what a rank uses never changes mid-run (exact resume).
        for name, tensor in entries.items():
            kind, _, key = name.partition("/")
            (self._image if kind == "image" else self._text).setdefault(key, tensor)

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
                self._pending[f"{kind}/{key}"] = self._unshared[f"{kind}/{key}"] = table[key]

    def share(self) -> None:
        """Send this rank's entries added since the last call to every other rank and take theirs.

        A collective (all-gather): every rank calls it at the same point, once per optimizer step.
        Without a process group (or with one rank) it only forgets what was to be sent."""
        import torch.distributed as dist

        unshared, self._unshared = self._unshared, {}
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        mine = (list(unshared), torch.stack(list(unshared.values())) if unshared else None)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # between the ranks of this run only: their own entries
        for rank, (their_names, rows) in enumerate(everyone):
            if rank != dist.get_rank() and their_names:
                self._merge(dict(zip(their_names, rows)))

    def flush(self) -> None:
        """Write this rank's new entries to a new file (atomically), then read other ranks' new files."""
        from safetensors.torch import save_file

        if self._pending:
            name = f"features-r{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"
            temporary = self.root / f".{name}.tmp"
            save_file(self._pending, str(temporary))
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())  # on disk before it gets its name: a crash leaves no half file behind it
            os.replace(temporary, self.root / name)
            self._read.add(name)
            self._pending = {}
        self.refresh()
