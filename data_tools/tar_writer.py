"""Deterministic WebDataset tar shards in img2dataset's layout, with per-shard stats.

A sample with key `000010042` (shard 00001, index 0042) becomes the members
`000010042.jpg`, `000010042.txt`, `000010042.json` and, for labelled data, `000010042.cls`.
Every tar header field that could vary between runs (mtime, owner, mode) is fixed, so the
same samples always give byte-identical shards. Each shard `NAME.tar` gets a `NAME_stats.json`
(inputs handled, successes, failures with reasons); `sizes.json` maps shard names to sample
counts and `stats.json` sums up the whole set.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataToolsError
from .samples import Failure, PreparedSample

DEFAULT_PATTERN = "{shard:05d}.tar"
# img2dataset's key: 5 digits of shard index then 4 digits of index in the shard (9 in all).
SHARD_DIGITS = 5
MIN_INDEX_DIGITS = 4
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the finished archive to a whole record
_MTIME = 0  # fixed member time: no timestamps in the data


def json_bytes(value: object) -> bytes:
    """Canonical JSON (sorted keys, UTF-8) so metadata files are reproducible."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


def stats_name(shard_name: str) -> str:
    """`00003.tar` -> `00003_stats.json` (img2dataset's naming)."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    return f"{stem}_stats.json"


def validate_pattern(pattern: str) -> None:
    """A shard name pattern must name distinct `.tar` files in the output folder itself."""
    try:
        first, second = pattern.format(shard=0), pattern.format(shard=1)
    except (KeyError, IndexError, ValueError) as error:
        raise DataToolsError(
            f"shard pattern {pattern!r} must use only the field {{shard}}, like {DEFAULT_PATTERN!r} ({error})."
        ) from None
    if first == second:
        raise DataToolsError(f"shard pattern {pattern!r} must contain {{shard}}, like {DEFAULT_PATTERN!r}.")
    if not first.endswith(".tar") or "/" in first or os.sep in first:
        raise DataToolsError(
            f"shard pattern {pattern!r} must name a .tar file without folders, like {DEFAULT_PATTERN!r}."
        )


def sample_members(key: str, sample: PreparedSample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order: image, txt, json, cls."""
    members = [(f"{key}.{sample.ext}", sample.image)]
    meta: dict = {
        "key": key,
        "source": sample.source,
        "width": sample.width,
        "height": sample.height,
        "original_width": sample.original_width,
        "original_height": sample.original_height,
    }
    if sample.captions:
        # Several captions: the .txt holds a JSON list (mmcl.data.decode samples one of them).
        # So does a single caption that looks like one, so that readers take it as text.
        single = sample.captions[0] if len(sample.captions) == 1 else None
        if single is not None and not (single.startswith("[") and single.endswith("]")):
            text = single
        else:
            text = json.dumps(sample.captions, ensure_ascii=False)
        members.append((f"{key}.txt", text.encode("utf-8")))
        meta["caption"] = sample.captions[0]
        if len(sample.captions) > 1:
            meta["captions"] = sample.captions
    if sample.label is not None:
        meta["label"] = sample.label
    members.append((f"{key}.json", json_bytes(meta)))
    if sample.label is not None:
        members.append((f"{key}.cls", str(sample.label).encode("ascii")))
    return members


def members_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a tar: a header block each plus data padded to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in members)


def finished_tar_size(payload: int) -> int:
    """File size of a tar whose members take `payload` bytes (end marker + record padding)."""
    return -(-(payload + 2 * _BLOCK) // _RECORD) * _RECORD


@dataclass
class ShardStats:
    """What happened while one shard was filled (img2dataset's `_stats.json`)."""

    name: str
    successes: int = 0
    failures: list[Failure] = field(default_factory=list)
    bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "shard": self.name,
            "count": self.successes + len(self.failures),
            "successes": self.successes,
            "failed": len(self.failures),
            "failure_reasons": dict(sorted(Counter(f.reason for f in self.failures).items())),
            "failures": [f.to_dict() for f in self.failures],
            "bytes": self.bytes,
        }


@dataclass
class ShardSetStats:
    """Totals for a written shard set; `shards` in writing order."""

    out_dir: str
    shards: list[ShardStats] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def successes(self) -> int:
        return sum(s.successes for s in self.shards)

    @property
    def count(self) -> int:
        return self.successes + len(self.failures)

    @property
    def failure_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(f.reason for f in self.failures).items()))

    def sizes(self) -> dict[str, int]:
        return {s.name: s.successes for s in self.shards}

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "successes": self.successes,
            "failed": len(self.failures),
            "failure_reasons": self.failure_reasons,
            "shards": len(self.shards),
            "sizes": self.sizes(),
            "failures": [f.to_dict() for f in self.failures],
        }


class ShardSetWriter:
    """Write samples into consecutive shards, starting a new one when the current is full.

    A shard is full at `samples_per_shard` samples, or when the next sample would push its
    file past `max_shard_bytes` (a single sample larger than that gets a shard of its own).
    Failures are recorded in the stats of the shard being filled when they occur. Each shard
    is written to `NAME.tmp` and renamed when complete, so a crash never leaves a shard that
    looks whole. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        pattern: str = DEFAULT_PATTERN,
        samples_per_shard: int = 10_000,
        max_shard_bytes: int | None = None,
    ):
        validate_pattern(pattern)
        if samples_per_shard < 1:
            raise DataToolsError(f"samples per shard must be at least 1, got {samples_per_shard}.")
        if max_shard_bytes is not None and max_shard_bytes < _RECORD:
            raise DataToolsError(f"max shard bytes must be at least {_RECORD} (one tar record), got {max_shard_bytes}.")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pattern = pattern
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.index_digits = max(MIN_INDEX_DIGITS, len(str(samples_per_shard - 1)))
        self.stats = ShardSetStats(out_dir=str(self.out_dir))
        self._pending_failures: list[Failure] = []
        self._tar: tarfile.TarFile | None = None
        self._shard: ShardStats | None = None
        self._payload = 0  # bytes of members written to the open shard

    def add(self, sample: PreparedSample) -> str:
        """Write one sample; returns its key."""
        members = sample_members(self._next_key(), sample) if self._shard is not None else None
        if members is not None and self._is_full(members_size(members)):
            self._close_shard()
        if self._shard is None:
            self._open_shard()
            members = sample_members(self._next_key(), sample)
        key = self._next_key()
        for name, data in members:
            self._add_member(name, data)
        self._payload += members_size(members)
        self._shard.successes += 1
        return key

    def fail(self, failure: Failure) -> None:
        """Record an input that could not be written."""
        self._pending_failures.append(failure)
        self.stats.failures.append(failure)

    def close(self) -> ShardSetStats:
        """Finish the last shard and write `sizes.json` and `stats.json`.

        Failures after the last sample go into the last shard's stats; when nothing could be
        written there is no shard, and `stats.json` alone lists the failures.
        """
        if self._shard is not None:
            self._close_shard()
        (self.out_dir / "sizes.json").write_bytes(json_bytes(self.stats.sizes()))
        (self.out_dir / "stats.json").write_bytes(json_bytes(self.stats.to_dict()))
        return self.stats

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            os.remove(self._tmp_path())

    def _next_key(self) -> str:
        """Key of the next sample in the open shard."""
        shard = len(self.stats.shards) - 1
        return f"{shard:0{SHARD_DIGITS}d}{self._shard.successes:0{self.index_digits}d}"

    def _is_full(self, next_size: int) -> bool:
        if self._shard.successes >= self.samples_per_shard:
            return True
        return self.max_shard_bytes is not None and finished_tar_size(self._payload + next_size) > self.max_shard_bytes

    def _open_shard(self) -> None:
        name = self.pattern.format(shard=len(self.stats.shards))
        self._shard = ShardStats(name=name)
        self.stats.shards.append(self._shard)
        self._payload = 0
        self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.USTAR_FORMAT)

    def _tmp_path(self) -> Path:
        return self.out_dir / f"{self._shard.name}.tmp"

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _close_shard(self) -> None:
        self._tar.close()
        final = self.out_dir / self._shard.name
        os.replace(self._tmp_path(), final)
        self._shard.bytes = final.stat().st_size
        self._shard.failures.extend(self._pending_failures)
        self._pending_failures = []
        (self.out_dir / stats_name(self._shard.name)).write_bytes(json_bytes(self._shard.to_dict()))
        self._tar = None
        self._shard = None
