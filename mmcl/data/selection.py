"""A selection file (a curated subset of the training shards), as the loader applies it.

The file (`data.selection`, written by `mmcl curate select`) is one Parquet file with one row per
selected sample:

    key: string            the sample's __key__ (the identity of a sample)
    probability: float64   its per-epoch sampling probability, in (0, 1] (1.0 = every epoch)
    shard: string          optional, with index: the shard's URL, redacted (`mmcl.redact.redact`)
    index: int32           optional, with shard: the sample's position among its shard's samples

In epoch `e` of a run with seed `s`, the sample with key `k` and probability `p` is delivered iff
`drawn(s, e, k, p)`: `derive_seed(s, "selection", e, k) / 2**64 < p`. Balanced samples (p < 1)
thus change from epoch to epoch and are the same on a rerun; samples with p = 1 are always drawn.

Memory (per process that reads the file: each rank and, copy-on-write, its workers), per row:
8 bytes (the key's 64-bit FNV-1a hash), plus 8 (its probability) for p < 1; with shard + index
columns another 4 bytes (the index), plus for p < 1 another 16 (row and probability) and the key
itself (its UTF-8 bytes + 4) to draw it per epoch. Ten million rows of 12-character keys, two
million of them balanced, take about 200 MB; reading the file peaks at about 180 bytes per row
for a moment. Each epoch's draw costs one hash per balanced row (~2 s per million). Two
different keys share a hash with probability ~n / 2**64 per unselected sample read (an
unselected sample would then be delivered): negligible at any real scale.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from mmcl.redact import redact

from .shards import ShardPiece, derive_seed

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


class SelectionError(ValueError):
    """A selection file that cannot be used; the message is one sentence naming the file."""


def drawn(seed: int, epoch: int, key: str, probability: float) -> bool:
    """True when the sample `key` (sampling probability `probability`) is delivered in `epoch`."""
    if probability >= 1.0:
        return True
    return derive_seed(seed, "selection", epoch, key) / 2**64 < probability


def key_hash(key: str) -> int:
    """The 64-bit FNV-1a hash of the key's UTF-8 bytes (the lookup's identity of a key)."""
    h = _FNV_OFFSET
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h


def _hash_strings(array) -> np.ndarray:
    """FNV-1a of every string of a pyarrow (large_)string array, vectorised: [n] uint64."""
    import pyarrow as pa

    if pa.types.is_string(array.type):
        offset_type = np.int32
    else:
        offset_type = np.int64
    n = len(array)
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[array.offset:array.offset + n + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = offsets[1:] - offsets[:-1]
    hashes = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    active = np.arange(n)
    prime = np.uint64(_FNV_PRIME)
    j = 0
    while active.size:
        active = active[lengths[active] > j]  # keys still longer than j bytes: the total work is the bytes
        if not active.size:
            break
        hashes[active] = (hashes[active] ^ data[offsets[active] + j].astype(np.uint64)) * prime
        j += 1
    return hashes


def _describe(path: str) -> str:
    return f"data.selection '{redact(path)}'"


def check_selection_file(path: str) -> None:
    """Raise `SelectionError` (one sentence) unless `path` is a usable selection file.

    Reads the Parquet footer only, plus the probability column where its statistics are missing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = _describe(path)
    if not os.path.isfile(path):
        raise SelectionError(f"{where} does not exist; point it at the Parquet file `mmcl curate select` wrote.")
    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a non-Parquet file
        raise SelectionError(f"{where} is not a Parquet file ({type(error).__name__}); "
                             "point it at the file `mmcl curate select` wrote.") from None
    schema = file.schema_arrow
    names = set(schema.names)
    missing = [c for c in ("key", "probability") if c not in names]
    if missing:
        raise SelectionError(f"{where} has no column {' or '.join(repr(c) for c in missing)}; "
                             "a selection needs 'key' and 'probability' (and optionally 'shard' with 'index').")
    if not (pa.types.is_string(schema.field("key").type) or pa.types.is_large_string(schema.field("key").type)):
        raise SelectionError(f"{where}: column 'key' must be strings, not {schema.field('key').type}.")
    if not pa.types.is_floating(schema.field("probability").type):
        raise SelectionError(f"{where}: column 'probability' must be floats, not {schema.field('probability').type}.")
    if ("shard" in names) != ("index" in names):
        raise SelectionError(f"{where} has a '{'shard' if 'shard' in names else 'index'}' column without its "
                             f"'{'index' if 'shard' in names else 'shard'}' column; give both or neither.")
    if file.metadata.num_rows == 0:
        raise SelectionError(f"{where} has no rows: nothing would be trained on; select at least one sample.")
    low, high = _probability_range(file)
    if not (low > 0.0 and high <= 1.0):  # also false for NaN
        raise SelectionError(f"{where} has probabilities outside (0, 1] (from {low} to {high}); "
                             "each must be > 0 and <= 1.")


def _probability_range(file) -> tuple[float, float]:
    """(min, max) of the probability column, from row-group statistics when every group has them."""
    column = file.schema_arrow.get_field_index("probability")
    leaf = [i for i in range(file.metadata.num_columns) if file.metadata.schema.column(i).name == "probability"]
    lows, highs = [], []
    for group in range(file.metadata.num_row_groups):
        stats = file.metadata.row_group(group).column(leaf[0]).statistics if leaf else None
        if stats is None or not stats.has_min_max or stats.null_count:
            break
        lows.append(float(stats.min))
        highs.append(float(stats.max))
    else:
        if lows:
            return min(lows) + 0.0, max(highs) + 0.0  # + 0.0: Parquet statistics write a zero minimum as -0.0
    values = file.read(columns=[file.schema_arrow.names[column]]).column(0)
    if values.null_count:
        return float("nan"), float("nan")
    array = values.to_numpy()
    return float(array.min()), float(array.max())


@dataclass
class Placement:
    """Where the selected rows lie: rows sorted by (shard, index), grouped per shard."""

    shards: dict[str, int]  # redacted shard URL -> its group number
    starts: np.ndarray  # [groups + 1] int64: group g's rows are rows starts[g]:starts[g+1]
    indices: np.ndarray  # [rows] int32: each row's index in its shard
    group_expected: np.ndarray  # [groups] float64: each group's sum of probabilities
    partial_rows: np.ndarray  # [balanced rows] int64: the rows with p < 1
    partial_p: np.ndarray  # [balanced rows] float64: their probabilities
    partial_keys: object  # pyarrow string array: their keys (drawn per epoch)

    def expected(self, groups: list[int]) -> float:
        return float(self.group_expected[groups].sum()) if groups else 0.0


@dataclass
class Selection:
    """The key -> probability lookup of a selection file, and where its rows lie when it says so."""

    path: str
    rows: int
    whole: np.ndarray  # sorted uint64 hashes of the keys with p = 1
    partial: np.ndarray  # sorted uint64 hashes of the keys with p < 1
    partial_p: np.ndarray  # their probabilities (float64)
    total: float  # expected samples per epoch: the sum of the probabilities
    placement: Placement | None
    _members: dict = field(default_factory=dict, repr=False)  # (seed, epoch, urls) -> members, last one
    _url_groups: dict = field(default_factory=dict, repr=False)  # url -> group (redacting is slow: once per URL)

    def probability(self, key: str) -> float:
        """The key's per-epoch probability; 0.0 for a key not in the selection."""
        h = np.uint64(key_hash(key))
        k = int(np.searchsorted(self.whole, h))
        if k < len(self.whole) and self.whole[k] == h:
            return 1.0
        k = int(np.searchsorted(self.partial, h))
        if k < len(self.partial) and self.partial[k] == h:
            return float(self.partial_p[k])
        return 0.0

    def delivers(self, seed: int, epoch: int, key: str) -> bool:
        """True when the sample `key` is selected and drawn in `epoch`."""
        p = self.probability(key)
        return p > 0.0 and drawn(seed, epoch, key, p)

    def groups(self, urls: list[str]) -> list[int | None] | None:
        """Each URL's group in the placement (None: no row there), or None when the placement
        cannot place these shards (no shard/index columns, or none of its shards is among `urls`)."""
        if self.placement is None:
            return None
        for url in urls:
            if url not in self._url_groups:
                self._url_groups[url] = self.placement.shards.get(redact(url))
        groups = [self._url_groups[url] for url in urls]
        return groups if any(g is not None for g in groups) else None

    def expected(self, urls: list[str]) -> float:
        """Expected samples per epoch among `urls`: the probabilities' sum over the rows in those
        shards when the file places its rows there, else over every row (keys alone identify)."""
        groups = self.groups(urls)
        if groups is None:
            return self.total
        return self.placement.expected(sorted({g for g in groups if g is not None}))

    def outside(self, urls: list[str]) -> int:
        """Rows whose shard is not among `urls` (0 without a usable placement)."""
        groups = self.groups(urls)
        if groups is None:
            return 0
        inside = {g for g in groups if g is not None}
        starts = self.placement.starts
        return self.rows - int(sum(starts[g + 1] - starts[g] for g in inside))

    def members(self, seed: int, epoch: int, urls: list[str]) -> list[np.ndarray] | None:
        """Per URL, the sorted shard indices of the rows drawn in `epoch` ([k] int64); None when
        the file does not place its rows in these shards. Costs one hash per balanced row (cached)."""
        groups = self.groups(urls)
        if groups is None:
            return None
        cache_key = (seed, epoch, tuple(urls))
        if cache_key in self._members:
            return self._members[cache_key]
        place = self.placement
        keep = np.ones(len(place.indices), dtype=bool)
        if len(place.partial_rows):
            keys = place.partial_keys.to_pylist()
            keep[place.partial_rows] = [drawn(seed, epoch, k, p) for k, p in zip(keys, place.partial_p.tolist())]
        out = []
        for g in groups:
            if g is None:
                out.append(np.zeros(0, dtype=np.int64))
                continue
            rows = slice(int(place.starts[g]), int(place.starts[g + 1]))
            out.append(np.unique(place.indices[rows][keep[rows]]).astype(np.int64))
        self._members = {cache_key: out}
        return out


def read_selection(path: str) -> Selection:
    """Read and check a selection file (see the module docstring); raises `SelectionError`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    check_selection_file(path)
    names = pq.ParquetFile(path).schema_arrow.names
    placed = "shard" in names and "index" in names
    table = pq.read_table(path, columns=["key", "probability"] + (["shard", "index"] if placed else []),
                          read_dictionary=["shard"] if placed else None)  # one string per shard, not per row
    if table.column("key").null_count:
        raise SelectionError(f"{_describe(path)} has rows without a key; every row needs its sample's key.")
    keys = table.column("key").combine_chunks()
    probabilities = table.column("probability").to_numpy().astype(np.float64)
    hashes = _hash_strings(keys)
    order = np.argsort(hashes, kind="stable")
    hashes, sorted_p = hashes[order], probabilities[order]
    same = hashes[1:] == hashes[:-1]
    if np.any(same & (sorted_p[1:] != sorted_p[:-1])):
        at = int(order[1:][same & (sorted_p[1:] != sorted_p[:-1])][0])
        raise SelectionError(f"{_describe(path)} gives key '{keys[at].as_py()}' two different probabilities; "
                             "keep one row per key.")
    first = np.concatenate([[True], ~same])  # a key listed twice (e.g. in two shards) is one lookup entry
    hashes, sorted_p = hashes[first], sorted_p[first]
    whole = sorted_p >= 1.0
    placement = None
    if placed:
        shard = table.column("shard")
        index = table.column("index")
        if shard.null_count or index.null_count:
            raise SelectionError(f"{_describe(path)} has rows without a shard or index; fill them or drop both columns.")
        if pa.types.is_dictionary(shard.type):
            encoded = pa.chunked_array(shard.chunks, shard.type).unify_dictionaries().combine_chunks()
        else:
            encoded = pc.dictionary_encode(shard.combine_chunks())
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        indices = index.to_numpy().astype(np.int32)
        rows = np.lexsort((indices, codes))
        codes, indices, row_p = codes[rows], indices[rows], probabilities[rows]
        groups = len(encoded.dictionary)
        starts = np.searchsorted(codes, np.arange(groups + 1)).astype(np.int64)
        partial_rows = np.nonzero(row_p < 1.0)[0].astype(np.int64)
        group_expected = np.bincount(codes, weights=row_p, minlength=groups).astype(np.float64)
        placement = Placement({str(name): g for g, name in enumerate(encoded.dictionary.to_pylist())}, starts,
                              indices, group_expected, partial_rows, row_p[partial_rows],
                              keys.take(pa.array(rows[partial_rows])))
    return Selection(path=path, rows=len(probabilities), whole=hashes[whole], partial=hashes[~whole],
                     partial_p=sorted_p[~whole], total=float(probabilities.sum()), placement=placement)


# ---------------------------------------------------------------------------- the split by selected samples


def member_pieces(urls: list[str], members: list[np.ndarray], consumer: int, num_consumers: int,
                  weights: list[int] | None = None, consumed: dict[str, set[int]] | None = None) -> list[ShardPiece]:
    """The pieces `consumer` reads when the selection says which samples the epoch delivers.

    urls: the epoch's shards in epoch order; members: per shard, the sorted indices delivered this
    epoch (`Selection.members`); consumed: url -> indices earlier segments took (elastic resume).
    The delivered samples not consumed yet, in epoch order, are cut into contiguous ranges, one per
    consumer, sized in proportion to `weights` (equal when None); each range's raw extent (from its
    first delivered sample to the next range's first) becomes the consumer's pieces. The extents
    partition every shard's index space (minus `consumed`), so each sample is read by exactly one
    consumer whatever the file says about indices; the file's indices only balance the shares.
    """
    consumed = consumed or {}
    remaining = []
    for url, indices in zip(urls, members):
        taken = consumed.get(url)
        remaining.append(indices[~np.isin(indices, np.fromiter(taken, np.int64, len(taken)))] if taken else indices)
    cumulative = np.cumsum([len(r) for r in remaining]) if remaining else np.zeros(0, np.int64)
    total = int(cumulative[-1]) if len(cumulative) else 0
    shares = weights if weights is not None else [1] * num_consumers
    whole = sum(shares)
    end = (len(urls), 0)

    def boundary(k: int) -> tuple[int, int]:
        """Raw position (shard, index) where consumer k's extent begins."""
        if k == 0:
            return (0, 0)
        if k == num_consumers:
            return end
        j = total * sum(shares[:k]) // whole if whole else total
        if j >= total:
            return end
        s = int(np.searchsorted(cumulative, j, side="right"))
        before = int(cumulative[s - 1]) if s else 0
        return (s, int(remaining[s][j - before]))

    (s0, i0), (s1, i1) = boundary(consumer), boundary(consumer + 1)
    pieces = []
    for s in range(s0, min(s1, len(urls) - 1) + 1):
        start = i0 if s == s0 else 0
        stop = i1 if s == s1 else None
        if stop is not None and stop <= start:
            continue
        taken = consumed.get(urls[s], ())
        exclude = frozenset(i for i in taken if i >= start and (stop is None or i < stop))
        pieces.append(ShardPiece(urls[s], start=start, stop=stop, exclude=exclude))
    return pieces
