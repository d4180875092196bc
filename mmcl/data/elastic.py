"""Elastic epochs: the rest of an interrupted epoch, split over a different set of consumers.

An epoch is played in *segments*. Segment 0 is the ordinary split (`shards.assign_pieces` over
`world_size * workers` consumers). When a run resumes mid-epoch with another layout (ranks,
nodes, data workers, micro batch), the consumers of the segment that was interrupted are
recorded with how far each got (its `cursor`: raw samples taken from its stream), and a new
segment starts:

- epoch mode: the samples of the epoch that no consumer of any earlier segment took (replayed
  from the recorded cursors, tar headers only) are the *remaining* set. In epoch order (shard
  order of the epoch, then sample index) it is cut into contiguous ranges, one per new
  consumer, sized in proportion to the consumer's batch quota, so every consumer has at least
  the samples its quota needs. Each remaining sample is kept by exactly one new consumer; none
  taken before is kept again (`ShardPiece.exclude`).
- resampled mode: there is no sample set to cover; each new consumer draws shards from its own
  generator seeded by (seed, epoch, consumer, segment). The continuation is a deterministic
  function of the checkpoint and the new layout, not the stream an uninterrupted run would have
  drawn (which is defined per consumer, and the consumers changed).

The next epoch is split the ordinary way over the new consumers. A segment can be interrupted
again, with yet another layout: the history grows by one segment each time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .shards import ShardPiece


@dataclass
class Segment:
    """One layout's part of an epoch: its consumer count, split weights and how far each consumer got."""

    consumers: int
    weights: list[int] | None  # per consumer, the split weights of that segment (None: equal; segment 0 records its quotas)
    cursors: list[int] = field(default_factory=list)  # raw stream items each consumer took

    def to_dict(self) -> dict[str, Any]:
        return {"consumers": self.consumers, "weights": self.weights, "cursors": list(self.cursors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Segment:
        weights = data.get("weights")
        return cls(int(data["consumers"]), [int(w) for w in weights] if weights is not None else None,
                   [int(c) for c in data["cursors"]])


@dataclass
class EpochPlan:
    """How the current epoch continues after one or more elastic resumes.

    history: the earlier segments of this epoch (their consumers no longer exist).
    weights: per consumer of the current segment (`rank * W + worker`), its batch quota, used to
        size its share of the remaining samples; None when the epoch has no quotas.
    quotas: this rank's workers' batch quotas for the rest of the epoch (None: until the data ends).
    """

    history: list[Segment]
    weights: list[int] | None
    quotas: list[int] | None

    @property
    def segment(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        return {"history": [s.to_dict() for s in self.history], "weights": self.weights, "quotas": self.quotas}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochPlan:
        ints = lambda v: [int(x) for x in v] if v is not None else None  # noqa: E731
        return cls([Segment.from_dict(s) for s in data["history"]], ints(data.get("weights")), ints(data.get("quotas")))


def consumer_tag(consumer: int, segment: int) -> tuple:
    """The consumer's identity in seeds: segment 0 keeps today's (so same-layout resume stays bit-exact)."""
    return (consumer,) if segment == 0 else (consumer, "segment", segment)


def _nth_remaining(n: int, taken: set[int]) -> int:
    """The shard index of the n-th (0-based) sample not in `taken`."""
    index, seen = 0, 0
    while True:
        if index not in taken:
            if seen == n:
                return index
            seen += 1
        index += 1


def remaining_pieces(urls: list[str], sizes: list[int] | None, consumed: dict[str, set[int]], consumer: int,
                     num_consumers: int, weights: list[int] | None) -> list[ShardPiece]:
    """What `consumer` of a later segment reads: its share of the samples not in `consumed`.

    urls / sizes: the epoch's shards in epoch order (sizes None when unknown).
    consumed: url -> sample indices taken by earlier segments.
    Over all consumers, each remaining sample is kept exactly once. With sizes, the shares are
    contiguous in epoch order and proportional to `weights` (equal when None); without sizes,
    every shard is shared by index modulo `num_consumers` (exact, but every consumer reads every
    shard's headers and the shares are only roughly equal).
    """
    if sizes is None:
        return [ShardPiece(url, stride=num_consumers, phase=consumer, exclude=frozenset(consumed.get(url, ())))
                for url in urls]
    counts = [size - sum(1 for i in consumed.get(url, ()) if i < size) for url, size in zip(urls, sizes)]
    total = sum(counts)
    shares = weights if weights is not None else [1] * num_consumers
    before, whole = sum(shares[:consumer]), sum(shares)
    low = total * before // whole if whole else 0
    high = total * (before + shares[consumer]) // whole if whole else 0
    pieces, offset = [], 0
    for url, count in zip(urls, counts):
        if count and offset < high and offset + count > low:
            first, last = max(low - offset, 0), min(high - offset, count)
            taken = consumed.get(url, set())
            start = _nth_remaining(first, taken)
            stop = _nth_remaining(last, taken) if last < count else None  # open-ended: a wrong size loses nothing
            exclude = frozenset(i for i in taken if i >= start and (stop is None or i < stop))
            pieces.append(ShardPiece(url, start=start, stop=stop, exclude=exclude))
        offset += count
    return pieces
