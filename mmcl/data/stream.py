"""Raw sample streams: tar parsing, shard sources and the shuffle buffer.

Everything here works on *raw* samples — dicts of undecoded bytes,
`{"__key__": str, "__url__": str, "__index__": int, "jpg": bytes, "txt": bytes, ...}` — so a
stream can be replayed cheaply (no image decoding) to fast-forward on resume.

Tar files are parsed here rather than with `tarfile` so that a broken archive is reported
precisely (a clean end needs the end-of-archive block; `tarfile` in stream mode silently stops
at a truncated header) and so that members of samples a consumer does not keep are skipped
without being read into memory, nor are members a consumer does not need or that exceed its
byte limit (`member_limit`; they become `decode.Unread` / `decode.Oversized` markers, so one
sample can never cost more memory than the limits). Shard byte streams come from `shards.open_shard` (webdataset.gopen), so every
URL scheme it supports works (local, `file:`, `pipe:`, `http(s)://` via curl, `gs://`, ...).

Shard-level problems are counted once per event, by the consumer that keeps the sample index
at which the problem happened (index 0 for a shard that cannot be opened): readers of the same
shard agree on that index, so several consumers sharing one shard never double count.
"""
from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from .decode import BadSample, Oversized, Unread
from .shards import ShardPiece, open_shard

# Markers between fill cycles (see pipeline.py); never counted as a stream position.
CYCLE_END = "__cycle_end__"

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META_FILE = re.compile(r"__[^/]*__($|/)")
_MAX_EXTENDED_HEADER = 1 << 20  # a pax / GNU long-name header above this is a corrupt archive

# extension -> bytes a reader may read of such a member (None: not needed, left unread)
MemberLimit = Callable[[str], "int | None"]


class StreamContext:
    """Shared by one consumer's readers: skip counts by reason, and the fast-forward flag.

    While `fast_forward` is set (resume), events are not counted (the saved counts already hold
    them) and members of seekable shards are not read: samples carry `LazyMember`s instead,
    loaded by `materialize` only if the sample is used after the fast-forward.
    `member_limit`: what the consumer reads of each member (see `iter_tar_samples`).
    `wanted`: key -> whether the consumer may use the sample (a selection's draw); the members of
    an unwanted sample are left unread and the sample comes out marked `__unwanted__`.
    """

    def __init__(self, skips: dict[str, int] | None = None, member_limit: MemberLimit | None = None,
                 wanted: Callable[[str], bool] | None = None):
        self.counts: dict[str, int] = dict(skips or {})
        self.fast_forward = False
        self.member_limit = member_limit
        self.wanted = wanted

    def add(self, reason: str, n: int = 1) -> None:
        if not self.fast_forward:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class LazyMember(NamedTuple):
    """A tar member's bytes left in place: read later with `materialize`."""

    url: str
    offset: int
    size: int


def materialize(sample: dict[str, Any]) -> dict[str, Any]:
    """Replace `LazyMember` values by their bytes (one open + seek per sample).

    Raises `BadSample("unreadable_shard")` if the shard changed or vanished meanwhile."""
    lazy = {k: v for k, v in sample.items() if isinstance(v, LazyMember)}
    if lazy:
        try:
            with open_shard(next(iter(lazy.values())).url) as stream:
                for key, member in lazy.items():
                    stream.seek(member.offset)
                    sample[key] = stream.read(member.size)
                    if len(sample[key]) != member.size:
                        raise OSError("short read")
        except OSError as error:
            raise BadSample("unreadable_shard", f"{sample.get('__url__')}: {error}") from error
    return sample


class BrokenTar(Exception):
    """A tar stream that ended or failed before its end-of-archive block.

    `index` is the sample index in progress when it broke; `reason` is `unreadable_shard` when
    nothing could be read at all, else `truncated_shard`.
    """

    def __init__(self, reason: str, index: int, detail: str):
        super().__init__(f"{reason} at sample {index}: {detail}")
        self.reason, self.index = reason, index


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _skip(stream, n: int) -> bool:
    """Advance `n` bytes; False if the stream ended first (only detectable when reading)."""
    if n <= 0:
        return True
    try:
        if stream.seekable():
            stream.seek(n, 1)
            return True
    except (AttributeError, OSError, ValueError):
        pass
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return False
        n -= len(chunk)
    return True


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _split_name(name: str) -> tuple[str | None, str | None]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key ends at the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


def iter_tar_samples(
    stream, url: str, keep: Callable[[int], bool], stop: int | None = None, lazy: Callable[[], bool] | None = None,
    member_limit: MemberLimit | None = None, wanted: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Group the files of a tar byte stream into samples; yield the kept ones.

    Files sharing a key (path up to the first dot of the basename) form one sample; a new key,
    or an extension already present, starts the next sample. Samples are numbered from 0 in
    tar order and `keep(index)` decides which are read; reading stops once `index >= stop`.
    `member_limit(extension)` (None: read everything) bounds what is read of a kept member: a
    member above it becomes `Oversized(size, limit)`, one it rates None becomes `Unread(size)`,
    both skipped without reading. While `lazy()` is true and the stream is seekable, the other
    kept members become `LazyMember`s. A kept sample whose key `wanted` rejects keeps its place
    in the numbering but none of its members are read: it is yielded marked `"__unwanted__": True`,
    its members' values None.
    Raises `BrokenTar` for a truncated or corrupt archive (the sample in progress is dropped).
    """
    index, current, kept, unwanted, any_member = -1, None, False, False, False
    try:
        seekable = bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    pending_name = None  # from a pax 'x' or GNU 'L' header, applies to the next member

    def broken(detail: str) -> BrokenTar:
        reason = "truncated_shard" if any_member else "unreadable_shard"
        return BrokenTar(reason, max(index, 0), detail)

    while True:
        try:
            header = _read_exact(stream, _BLOCK)
        except Exception as error:  # pipe exit status, network errors...
            raise broken(f"{type(error).__name__}: {error}") from error
        if len(header) < _BLOCK:
            raise broken("the archive ends without its end-of-archive block" if not header else "truncated header")
        if header == _ZERO_BLOCK:
            break
        checksum = sum(header) - sum(header[148:156]) + 8 * 32
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            stored, size = -1, 0
        if stored != checksum:
            raise broken("bad header checksum (not a tar file, or corrupt)")
        kind = header[156:157]
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind in (b"x", b"L", b"g", b"K"):  # pax / GNU long-name metadata for the next member
            if size > _MAX_EXTENDED_HEADER:
                raise broken(f"an extended header of {size} bytes (corrupt archive)")
            try:
                data = _read_exact(stream, padded)
            except Exception as error:
                raise broken(f"{type(error).__name__}: {error}") from error
            if len(data) < padded:
                raise broken("truncated extended header")
            data = data[:size]
            if kind == b"L":
                pending_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                for record in data.decode("utf-8", "replace").split("\n"):
                    _, _, field = record.partition(" ")
                    if field.startswith("path="):
                        pending_name = field[5:]
            continue
        if pending_name is not None:
            name, pending_name = pending_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        prefix, suffix = _split_name(name) if kind in (b"0", b"\0", b"7") else (None, None)
        if prefix is None or _META_FILE.match(name):
            try:
                ok = _skip(stream, padded)
            except Exception as error:
                raise broken(f"{type(error).__name__}: {error}") from error
            if not ok:
                raise broken("truncated member")
            continue
        if current is None or prefix != current["__key__"] or suffix in current:
            if current is not None and kept:
                yield current
            index += 1
            if stop is not None and index >= stop:
                return
            kept = keep(index)
            current = {"__key__": prefix, "__url__": url, "__index__": index}
            unwanted = kept and wanted is not None and not wanted(prefix)
            if unwanted:
                current["__unwanted__"] = True
        limit = member_limit(suffix) if kept and member_limit is not None else -1
        try:
            if unwanted:
                data, ok = None, _skip(stream, padded)
            elif kept and limit is None:
                data, ok = Unread(size), _skip(stream, padded)
            elif kept and limit >= 0 and size > limit:
                data, ok = Oversized(size, limit), _skip(stream, padded)
            elif kept and seekable and lazy is not None and lazy():
                data, ok = LazyMember(url, stream.tell(), size), _skip(stream, padded)
            elif kept:
                data = _read_exact(stream, size)  # then the padding: no copy of a large member
                ok = len(data) == size and _skip(stream, padded - size)
            else:
                data, ok = b"", _skip(stream, padded)
        except Exception as error:
            raise broken(f"{type(error).__name__}: {error}") from error
        if not ok:
            raise broken(f"truncated member {name}")
        current[suffix] = data  # None for an unwanted sample: it never reaches decoding
        any_member = True
    if current is not None and kept:
        yield current


def read_piece(piece: ShardPiece, context: StreamContext, count_events: bool = True) -> Iterator[dict[str, Any]]:
    """Kept raw samples of one shard piece; open/read failures are counted, never raised."""
    try:
        stream = open_shard(piece.url)
    except Exception:
        if count_events and piece.keeps(0):
            context.add("unreadable_shard")
        return
    try:
        yield from iter_tar_samples(stream, piece.url, piece.keeps, piece.stop, lambda: context.fast_forward,
                                    context.member_limit, context.wanted)
    except BrokenTar as error:
        if count_events and piece.keeps(error.index):
            context.add(error.reason)
    finally:
        try:
            stream.close()
        except Exception:  # a pipe's nonzero exit status surfaces here; the shard is already counted
            pass


def pieces_source(pieces: Iterable[ShardPiece], context: StreamContext) -> Iterator[dict[str, Any]]:
    for piece in pieces:
        yield from read_piece(piece, context)


def fill_source(order: list[str], first: int, context: StreamContext) -> Iterator[Any]:
    """Whole shards of the epoch, cycling from `order[first]`, marked `__fill__`; CYCLE_END after
    each full cycle so the consumer can stop when a whole cycle gave nothing usable. Events are
    not counted: fill re-reads shards that their owners already counted."""
    while order:
        for k in range(len(order)):
            for sample in read_piece(ShardPiece(order[(first + k) % len(order)]), context, count_events=False):
                sample["__fill__"] = True
                yield sample
        yield CYCLE_END


def resampled_source(
    sources: list[list[str]], weights: list[float] | None, rng: random.Random, context: StreamContext
) -> Iterator[dict[str, Any]]:
    """Shards drawn with replacement, forever: a source by `weights` (uniform over shards when
    None), then a shard uniformly within it. Samples carry their draw number in `__draw__`.
    Stops only after `resample_patience(shards)` consecutive draws that yielded no sample at
    all (every shard missing or empty)."""
    if weights is None:
        flat = [url for urls in sources for url in urls]
        sources, weights = [flat], [1.0]
    empty_draws, limit = 0, resample_patience(sum(len(urls) for urls in sources))
    population = range(len(sources))
    for draw in itertools.count():
        if empty_draws >= limit:
            return
        urls = sources[rng.choices(population, weights=weights)[0]]
        url = urls[rng.randrange(len(urls))]
        got = False
        for sample in read_piece(ShardPiece(url), context):
            got = True
            sample["__draw__"] = draw
            yield sample
        empty_draws = 0 if got else empty_draws + 1


def resample_patience(num_shards: int) -> int:
    """Consecutive useless shard draws after which resampling gives up: with even one good shard
    among `num_shards`, such a run has probability below e^-10."""
    return 10 * num_shards + 100


def shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: hold `bufsize` items, emit a random one per new item, then drain.

    Deterministic given `rng`'s seed. `bufsize <= 1` passes items through.
    """
    if bufsize <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        k = rng.randrange(bufsize)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer
