"""Shard lists: URL expansion, shard sizes, and which samples each consumer reads.

A shard is a tar file in img2dataset / WebDataset layout, addressed by anything
`webdataset.gopen` opens: a local path, `file:`, `pipe:<command>`, `http(s)://` (curl), and
the other schemes it knows. A pattern uses brace expansion (`data/{00000..00127}.tar`) or, for
local paths, glob wildcards (`data/*.tar`); several sources join with `::`.

A *consumer* is one DataLoader worker of one rank: there are `world_size * max(1, num_workers)`
of them, consumer `c = rank * W + worker`. In epoch mode `assign_pieces` gives each consumer a
list of `ShardPiece`s (a shard plus the sample indices to keep from it) such that, for every
shard count, every sample index of every shard is kept by exactly one consumer:

- shard sizes known (``sizes.json`` next to the shards): the epoch's shards, in order, form one
  index space of `T` samples cut into `n` contiguous ranges `[c*T//n, (c+1)*T//n)`. Consumers
  get equal shares (+-1 sample) whatever the shard count; a shard is read by every consumer
  whose range overlaps it (at most `S + n - 1` shard reads per epoch). The last range inside a
  shard is open-ended, so a wrong size never loses or duplicates a sample.
- sizes unknown, `S >= n` shards: round-robin whole shards (`order[c::n]`).
- sizes unknown, `S < n`: consumer `c` reads shard `c % S` and keeps sample `i` iff
  `i % k == c // S`, where `k` consumers share that shard.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import braceexpand

__all__ = [
    "NoShardsError",
    "ShardPiece",
    "expand_shards",
    "read_shard_sizes",
    "assign_pieces",
    "derive_seed",
]


class NoShardsError(ValueError):
    """A shard pattern matched nothing; the message names the pattern."""


@dataclass(frozen=True)
class ShardPiece:
    """Samples `i` of shard `url` with `start <= i < stop` and `(i - start) % stride == phase`.

    `stop` is None for "to the end of the shard". Indices count samples (groups of files that
    share a key) in tar order, bad ones included, so every reader of a shard agrees on them.
    `exclude`: indices never kept (an elastic resume's samples already consumed this epoch).
    """

    url: str
    start: int = 0
    stop: int | None = None
    stride: int = 1
    phase: int = 0
    exclude: frozenset[int] = frozenset()

    def keeps(self, index: int) -> bool:
        if index < self.start or (self.stop is not None and index >= self.stop):
            return False
        return (index - self.start) % self.stride == self.phase and index not in self.exclude


def is_local(url: str) -> bool:
    """True for a plain path or a `file:` URL (something `os.path` can check)."""
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def expand_shards(pattern: str) -> list[list[str]]:
    """Expand a `::`-joined shard pattern into one URL list per source.

    Local sources keep only the shards that exist, unless none do: then `NoShardsError` names
    the pattern (a partly missing local source is allowed; its missing shards are counted as
    `unreadable_shard` when read). Remote URLs (`pipe:`, `http://`...) cannot be checked and are
    kept as written.
    """
    if not pattern or not pattern.strip():
        raise NoShardsError("the shard pattern is empty; set data.train_shards to e.g. 'data/{00000..00127}.tar'.")
    sources = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            raise NoShardsError(f"shard pattern '{pattern}' has an empty '::' part.")
        urls = list(braceexpand.braceexpand(os.path.expandvars(part)))
        if all(is_local(u) for u in urls):
            found = []
            for url in urls:
                path = os.path.expanduser(_local_path(url))
                # A wildcard lists what exists; a named shard stays even if missing (counted when read).
                found.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
            if not any(os.path.isfile(u) for u in found):
                where = f" (in '{pattern}')" if part != pattern else ""
                raise NoShardsError(f"no shard files match '{part}'{where}; check the path and the {{start..end}} range.")
            urls = found
        sources.append(urls)
    return sources


def read_shard_sizes(urls: list[str]) -> list[int] | None:
    """Sample count of each shard, or None if any is unknown.

    Looks next to each local shard for `sizes.json` (`{"00000.tar": 10000, ...}`, the
    WebDataset/OpenCLIP convention) or img2dataset's `00000_stats.json` (`successes`).
    """
    cache: dict[str, dict] = {}
    sizes = []
    for url in urls:
        if not is_local(url):
            return None
        path = _local_path(url)
        folder, name = os.path.split(path)
        if folder not in cache:
            table = {}
            sizes_file = os.path.join(folder or ".", "sizes.json")
            if os.path.isfile(sizes_file):
                try:
                    with open(sizes_file) as f:
                        table = {str(k): int(v) for k, v in json.load(f).items()}
                except (OSError, ValueError, AttributeError, TypeError):
                    table = {}
            cache[folder] = table
        size = cache[folder].get(name)
        if size is None:
            stats = os.path.join(folder or ".", name.split(".")[0] + "_stats.json")
            try:
                with open(stats) as f:
                    size = int(json.load(f)["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        sizes.append(size)
    return sizes


def assign_pieces(urls: list[str], sizes: list[int] | None, consumer: int, num_consumers: int) -> list[ShardPiece]:
    """The pieces of `urls` (already in this epoch's order) that `consumer` reads.

    Exact: over all consumers `0..num_consumers-1`, each sample index of each shard is kept by
    exactly one piece. See the module docstring for the three cases.
    """
    n, c, count = num_consumers, consumer, len(urls)
    if not 0 <= c < n:
        raise ValueError(f"consumer {c} out of range for {n} consumers")
    if sizes is not None:
        return _contiguous_pieces(urls, sizes, c, n)
    if count >= n:
        return [ShardPiece(url) for url in urls[c::n]]
    if count == 0:
        return []
    sharing = len(range(c % count, n, count))
    return [ShardPiece(urls[c % count], stride=sharing, phase=c // count)]


def _contiguous_pieces(urls: list[str], sizes: list[int], c: int, n: int) -> list[ShardPiece]:
    total = sum(sizes)
    bounds = [k * total // n for k in range(n + 1)]  # consumer k owns [bounds[k], bounds[k+1])

    def owner(position: int) -> int:
        # Largest k with bounds[k] <= position; its range is non-empty unless position >= total.
        return min(bisect.bisect_right(bounds, position) - 1, n - 1)

    pieces, offset = [], 0
    for url, size in zip(urls, sizes):
        first = owner(offset)
        last = owner(offset + size - 1) if size > 0 else first
        if first <= c <= last:
            start = 0 if c == first else bounds[c] - offset
            stop = None if c == last else bounds[c + 1] - offset
            pieces.append(ShardPiece(url, start=start, stop=stop))
        offset += size
    return pieces


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any mix of ints and strings; stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]
