"""Shard lists: URL expansion, shard sizes, and which samples each consumer reads.

A shard is a tar file in img2dataset / WebDataset layout, addressed by anything
`webdataset.gopen` opens: a local path, `file:`, `pipe:<command>`, `http(s)://` (curl), and
the other schemes it knows. A pattern uses brace expansion (`data/{00000..00127}.tar`) or, for
local paths, glob wildcards (`data/*.tar`); several sources join with `::`. `$VAR` is expanded
here, except in a `pipe:` command, which the shell runs with its variables as written; every
shard string that leaves this module in a message is redacted (`mmcl.redact`). With
webdataset's `WDS_SECURE=1`, `pipe:` sources are refused, here and in the size lookup.

A *consumer* is one DataLoader worker of one rank: there are `world_size * max(1, num_workers)`
of them, consumer `c = rank * W + worker`. In epoch mode `assign_pieces` gives each consumer a
list of `ShardPiece`s (a shard plus the sample indices to keep from it) such that, for every
shard count, every sample index of every shard is kept by exactly one consumer:

- shard sizes known (``sizes.json`` or img2dataset's ``NNNNN_stats.json`` next to the shards, read
  through the shards' own URL scheme, see `sibling_url`): the epoch's shards, in order, form one
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
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlparse, urlsplit, urlunsplit

import braceexpand

from mmcl.redact import expand_env, redact

__all__ = [
    "NoShardsError",
    "PipeRefusedError",
    "refuse_pipes",
    "secure_mode",
    "ShardPiece",
    "expand_shards",
    "read_shard_sizes",
    "lookup_shard_sizes",
    "SizeLookup",
    "sibling_url",
    "assign_pieces",
    "derive_seed",
]


class NoShardsError(ValueError):
    """A shard pattern matched nothing; the message names the pattern (redacted)."""


class PipeRefusedError(NoShardsError):
    """A `pipe:` shard source while webdataset's WDS_SECURE=1 forbids shell commands."""


def secure_mode() -> bool:
    """webdataset's `WDS_SECURE`: set (to anything but 0) means no `pipe:` command may run."""
    return os.environ.get("WDS_SECURE", "0").strip() not in ("", "0")


def refuse_pipes(pattern: str | None, key: str = "data.train_shards") -> None:
    """Raise `PipeRefusedError` when WDS_SECURE=1 and a `::` part of `pattern` is a `pipe:` command."""
    if not pattern or not secure_mode():
        return
    for part in pattern.split("::"):
        if part.strip().startswith("pipe:"):
            raise PipeRefusedError(f"{key} source '{redact(part.strip())}' is a pipe: command, which WDS_SECURE=1 "
                                   "forbids; unset WDS_SECURE or name the shards by URL (http(s)://, s3://...).")


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


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of one shard: local paths (and `file:`) through `open`, anything else
    through `webdataset.gopen`. Under `WDS_SECURE=1` gopen refuses local files as well as
    `pipe:` commands; mmcl keeps reading the user's own files there and refuses only the pipes
    (`refuse_pipes`, before the run starts)."""
    if is_local(url):
        return open(_local_path(url), "rb")
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def expand_shards(pattern: str, require_existing: bool = True) -> list[list[str]]:
    """Expand a `::`-joined shard pattern (brace ranges, globs, folders of .tar files) into one URL list per source.

    Local sources keep only the shards that exist, unless none do: then `NoShardsError` names
    the pattern (a partly missing local source is allowed; its missing shards are counted as
    `unreadable_shard` when read; with `require_existing=False`, as the shard inspector wants, a
    wholly missing source is kept as named too). Remote URLs (`pipe:`, `http://`...) cannot be checked and are
    kept as written.
    """
    if not pattern or not pattern.strip():
        raise NoShardsError("the shard pattern is empty; set data.train_shards to e.g. 'data/{00000..00127}.tar'.")
    sources = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            raise NoShardsError(f"shard pattern '{redact(pattern)}' has an empty '::' part.")
        if part.startswith("pipe:"):
            refuse_pipes(part, "the shard")
            urls = list(braceexpand.braceexpand(part))  # its $VAR are the shell's, not ours
        else:
            urls = list(braceexpand.braceexpand(expand_env(part)))
        if all(is_local(u) for u in urls):
            found = []
            for url in urls:
                path = os.path.expanduser(_local_path(url))
                # A wildcard lists what exists, a folder its .tar files; a named shard stays even if
                # missing (counted when read).
                if os.path.isdir(path):
                    found.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))))
                else:
                    found.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
            if require_existing and not any(os.path.isfile(u) for u in found):
                where = f" (in '{redact(pattern)}')" if part != pattern else ""
                raise NoShardsError(f"no shard files match '{redact(part)}'{where}; check the path and the {{start..end}} range.")
            urls = found
        sources.append(urls)
    return sources


def read_shard_sizes(urls: list[str]) -> list[int] | None:
    """Sample count of each shard, or None if any is unknown (see `lookup_shard_sizes`)."""
    return lookup_shard_sizes(urls).sizes


@dataclass(frozen=True)
class SizeLookup:
    """`sizes`: one sample count per shard, or None when some shard's is unknown; `missing`
    then says which shard first and why (e.g. "no sizes.json entry or 00002_stats.json for
    http://host/00002.tar (HTTP 404)")."""

    sizes: list[int] | None
    missing: str | None = None


def lookup_shard_sizes(urls: list[str], threads: int = 16) -> SizeLookup:
    """Sample counts from `sizes.json` (`{"00000.tar": 10000, ...}`, the WebDataset/OpenCLIP
    convention) beside the shards, else img2dataset's `00000_stats.json` (`successes`) beside
    each shard, both read through the shard's own URL scheme (`sibling_url`): a local file, an
    http(s) GET, the shard's `pipe:` command run for the sibling, or `webdataset.gopen` for its
    other schemes. Each distinct `sizes.json` is read once; remote files are read `threads` at
    a time, in blocks that stop at the first shard without a size. Every rank reads the same
    files, so all agree without a collective.
    """
    located = [(url, _shard_name(url)) for url in urls]
    unnamed = next((url for url, name in located if name is None), None)
    if unnamed is not None:
        return SizeLookup(None, f"no shard file name (NAME.tar) to look up sizes for in '{redact(unnamed)}'")
    tables = _map(_sizes_table, sorted({sibling_url(url, "sizes.json") for url in urls}), threads)
    sizes: list[int | None] = [tables[sibling_url(url, "sizes.json")].get(name) for url, name in located]
    todo = [i for i, size in enumerate(sizes) if size is None]
    block = max(1, 4 * threads)
    for first in range(0, len(todo), block):
        chunk = todo[first:first + block]
        stats = _map(lambda i: _read_json(sibling_url(urls[i], stats_file_name(located[i][1]))), chunk, threads)
        for i in chunk:
            value, why = stats[i]
            count = value.get("successes") if isinstance(value, dict) else None
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                why = why or "it has no 'successes' count"
                return SizeLookup(None, f"no sizes.json entry or {stats_file_name(located[i][1])} for {redact(urls[i])} ({redact(why)})")
            sizes[i] = count
    return SizeLookup([int(size) for size in sizes])


_TAR_NAME = re.compile(r"[^/\s'\"=:;|&<>()]+?\.(?:tar|tgz|tar\.[A-Za-z0-9]+)(?=$|[\s'\"?#;|&<>)])")


def _shard_name(url: str) -> str | None:
    """The shard's file name: a local path's or URL path's last part; for `pipe:COMMAND`, the
    last word part of the command that names a `.tar` (`.tar.gz`, `.tgz`...) file."""
    if url.startswith("pipe:"):
        span = _pipe_name_span(url)
        return url[span[0]:span[1]] if span else None
    if is_local(url):
        return os.path.basename(_local_path(url)) or None
    return urlsplit(url).path.rpartition("/")[2] or None


def _pipe_name_span(url: str) -> tuple[int, int] | None:
    matches = list(_TAR_NAME.finditer(url))
    return matches[-1].span() if matches else None


def sibling_url(url: str, file_name: str) -> str:
    """Where `file_name` lies beside shard `url`, addressed the same way.

    Local: same folder. URL (http(s)://, s3://, ...): the path's last part replaced, query kept
    (`http://host/d/00001.tar?t=x` -> `http://host/d/00001_stats.json?t=x`). `pipe:COMMAND`: the
    same command with the shard's file name (the last `NAME.tar` in it) replaced
    (`pipe:curl -s http://host/d/00001.tar` -> `pipe:curl -s http://host/d/00001_stats.json`).
    A `pipe:` command without a `NAME.tar` has no sibling: `ValueError`.
    """
    if url.startswith("pipe:"):
        span = _pipe_name_span(url)
        if span is None:
            raise ValueError(f"no shard file name (NAME.tar) in '{redact(url)}'")
        return url[:span[0]] + file_name + url[span[1]:]
    if is_local(url):
        return os.path.join(os.path.dirname(_local_path(url)) or ".", file_name)
    parts = urlsplit(url)
    folder = parts.path.rpartition("/")[0]
    return urlunsplit(parts._replace(path=f"{folder}/{file_name}"))


def stats_file_name(shard_name: str) -> str:
    """img2dataset's stats file of a shard: `00003.tar` -> `00003_stats.json`."""
    stem = re.sub(r"\.(?:tar|tgz|tar\.[A-Za-z0-9]+)$", "", shard_name)
    return f"{stem}_stats.json"


def _sizes_table(where: str) -> dict[str, int]:
    """A `sizes.json`'s entries (shard file name -> count); empty when absent or malformed."""
    value, _ = _read_json(where)
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


_remote_json: dict[str, object] = {}  # location -> parsed JSON: one process reads a remote file once


def _read_json(where: str) -> tuple[object | None, str | None]:
    """(parsed JSON, None), or (None, why not) when `where` cannot be read or parsed."""
    if where in _remote_json:
        return _remote_json[where], None
    try:
        if where.startswith("pipe:"):
            if secure_mode():
                return None, "WDS_SECURE=1 forbids pipe: commands"
            data = _run_pipe(where[len("pipe:"):])
        elif is_local(where):
            with open(_local_path(where), "rb") as f:
                data = f.read()
        elif urlsplit(where).scheme in ("http", "https"):
            data = _http_get(where)
        else:
            from webdataset.gopen import gopen

            with gopen(where, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        return None, "not found"
    except Exception as error:  # any failure to read means "size unknown", reported with its reason
        return None, str(error) or type(error).__name__
    try:
        value = json.loads(data)
    except ValueError:
        return None, "not valid JSON"
    if not is_local(where):
        _remote_json[where] = value
    return value, None


def _run_pipe(command: str, timeout: float = 120) -> bytes:
    result = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout)
    if result.returncode != 0:
        raise OSError(f"the command exited with status {result.returncode}")
    return result.stdout


def _http_get(url: str, attempts: int = 3, timeout: float = 30) -> bytes:
    """GET `url`; a missing file (4xx) fails at once, a server or network error (5xx, 429) is retried.

    `user:password@` in the URL is sent as HTTP basic auth, as curl (webdataset's reader) does.
    """
    import base64
    from urllib.error import HTTPError, URLError
    from urllib.parse import unquote
    from urllib.request import Request, urlopen

    parts = urlsplit(url)
    headers = {}
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        credentials = f"{unquote(user)}:{unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        url = urlunsplit(parts._replace(netloc=host))
    for attempt in range(attempts):
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as response:
                return response.read()
        except HTTPError as error:
            if (error.code < 500 and error.code != 429) or attempt == attempts - 1:
                raise OSError(f"HTTP {error.code}") from None
        except (URLError, OSError) as error:
            if attempt == attempts - 1:
                raise OSError(str(getattr(error, "reason", error))) from None
        time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _map(function, items: list, threads: int) -> dict:
    """item -> function(item), several at a time (reads of remote files wait on the network)."""
    if len(items) <= 1:
        return {item: function(item) for item in items}
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return dict(zip(items, pool.map(function, items)))


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
