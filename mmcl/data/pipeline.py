"""One consumer's batches for one epoch: a pure function of (config, epoch, worker, start state).

A consumer is one DataLoader worker of one rank (`consumer = rank * W + worker`,
`W = max(1, num_workers)`). Its stream, for epoch `e`:

    epoch mode:      shards in epoch order (seeded by seed, e; the same on every rank)
                     -> this consumer's pieces (shards.assign_pieces) -> sample shuffle buffer
                     [-> fill: whole shards of the epoch, cycling, when a quota is set]
    resampled mode:  shards drawn with replacement (seeded by seed, e, consumer) -> shuffle buffer

    -> position p = number of raw samples taken so far
    [-> with a selection (`data.selection`, selection.py): samples not selected, or not drawn in
       this epoch, are dropped here by their key, before any decoding, and counted `unselected`]
    -> decode + transform, with every random choice seeded by (seed, e, consumer, p)
    -> batches of `batch_size` good samples, each carrying `_meta` (worker, cursor = p after the
       batch, batches so far, cumulative skip counts) for the loader's state.

NaFlex sequence lengths (`cfg.lengths`, naflex.LengthSchedule): before decoding a batch's samples
the consumer knows which batch of the rank's epoch it fills — the DataLoader hands out batches
round-robin over the workers, whose quotas are split larger-first, so logical worker w's k-th
batch is the rank's batch `offset + k*W + w` (offset: the batches an elastic resume's earlier
segments already gave, else 0) — and so that batch's step, sequence length L and size: its
images are resized to fit L patches and padded to L, and it holds B_L samples.

Bad samples are skipped and counted by reason: `decode_sample` turns whatever one sample's
bytes make go wrong into a `BadSample`, and the tar reader never reads a member beyond the
sample spec's byte limits. A consumer stops at its quota (batches per
epoch), when its data ends, or — for the infinite streams — when nothing usable comes out any
more: a whole fill cycle without a good sample, or `resample_patience(shards)` shard draws in a
row without one (with a single good shard among them that has probability < e^-10).

Resume: `start.cursor` raw samples are taken from the stream without decoding, which puts
shard readers and the shuffle buffer in exactly the state they had; counters restart from
`start` instead of being recounted. For seekable (local) shards only tar headers are read while
fast-forwarding; the few samples still in the shuffle buffer afterwards load their bytes on
use. Non-seekable streams (pipe:, http) are re-read, still without decoding.

Elastic resume (elastic.py): an epoch continued on another layout is a later *segment*: the
consumer reads its share of the samples no consumer of an earlier segment took, and its seeds
carry the segment number.

Selection: when the selection file places its rows (shard + index columns), the epoch's pieces
are cut by *delivered* samples instead of raw ones (`selection.member_pieces`), so consumers get
equal shares of what they deliver; without placement the raw split applies and the filter alone
selects.

Fill: with a quota (equal steps per rank), a consumer whose own samples run short — the
quota is rounded up, or samples were bad, or a shard is missing — continues with the epoch's
shards read whole from a consumer-specific offset. Those repeated samples are counted in
`repeated`; their skips are not counted again (each shard's owner already counted them).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch.utils.data import get_worker_info

from .decode import BadSample
from .elastic import EpochPlan, Segment, consumer_tag, remaining_pieces
from .naflex import LengthSchedule
from .samples import Sample, SampleSpec, collate, decode_sample
from .selection import Selection, member_pieces
from .shards import assign_pieces, derive_seed
from .stream import (
    CYCLE_END,
    StreamContext,
    fill_source,
    materialize,
    pieces_source,
    resample_patience,
    resampled_source,
    shuffled,
)
from .tokenize import CaptionTokenizer


@dataclass
class StreamConfig:
    """Everything a consumer needs; fixed for the lifetime of a loader (pickled into workers)."""

    sources: list[list[str]]  # shard URLs per `::` source
    weights: list[float] | None  # per source, resampled mode
    sizes: list[int] | None  # per shard of the flattened sources; None = unknown
    resampled: bool
    shuffle: bool  # shard order per epoch + sample buffer
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    quotas: list[int] | None  # batches per worker per epoch; None = until the data ends
    drop_last: bool  # without quotas: drop each worker's final partial batch
    sample: SampleSpec
    tokenize: CaptionTokenizer | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # A distillation teacher's inputs (its transform is sample.teacher_transform); None without one.
    teacher_tokenize: CaptionTokenizer | None = None
    teacher_mean: tuple[float, float, float] | None = None
    teacher_std: tuple[float, float, float] | None = None
    selection: Selection | None = None  # data.selection: only its samples drawn in the epoch are delivered
    # NaFlex per-step sequence lengths and token-budget batch sizes (training); None: every batch has
    # `batch_size` samples and the sample spec's own transform
    lengths: LengthSchedule | None = None

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def urls(self) -> list[str]:
        return [url for urls in self.sources for url in urls]


@dataclass
class WorkerState:
    """Where one worker is within the epoch, as of the last batch the trainer received from it."""

    cursor: int = 0  # raw samples taken from the worker's stream
    batches: int = 0  # batches produced this epoch
    skips: dict[str, int] = field(default_factory=dict)  # cumulative this epoch
    repeated: int = 0  # fill samples delivered this epoch
    unselected: int = 0  # raw samples dropped this epoch: not in the selection, or not drawn in the epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerState:
        return cls(int(data["cursor"]), int(data["batches"]), dict(data["skips"]), int(data.get("repeated", 0)),
                   int(data.get("unselected", 0)))


def raw_stream(cfg: StreamConfig, epoch: int, worker: int, context: StreamContext,
               plan: EpochPlan | None = None) -> Iterator[Any]:
    """The consumer's raw samples for the epoch (plus CYCLE_END markers in the fill part).

    plan: set when this epoch continues after an elastic resume (see elastic.py): the consumer
    then reads its share of the samples no earlier segment took.
    """
    consumer = cfg.rank * cfg.workers_per_rank + worker
    num_consumers = cfg.world_size * cfg.workers_per_rank
    if plan is None:
        return consumer_stream(cfg, epoch, consumer, num_consumers, 0, segment_weights(cfg), {}, context,
                               cfg.quotas is not None)
    consumed = {} if cfg.resampled else consumed_samples(cfg, epoch, plan.history)
    return consumer_stream(cfg, epoch, consumer, num_consumers, plan.segment, plan.weights, consumed, context,
                           plan.quotas is not None)


def consumer_stream(cfg: StreamConfig, epoch: int, consumer: int, num_consumers: int, segment: int,
                    weights: list[int] | None, consumed: dict[str, set[int]], context: StreamContext,
                    fill: bool) -> Iterator[Any]:
    """Raw samples of `consumer` (of `num_consumers`) in `segment` of the epoch; see the module docstring."""
    tag = consumer_tag(consumer, segment)
    buffer_rng = random.Random(derive_seed(cfg.seed, "sample-order", epoch, *tag))
    buffer = cfg.shuffle_buffer if cfg.shuffle else 0
    if cfg.resampled:
        shard_rng = random.Random(derive_seed(cfg.seed, "resample", epoch, *tag))
        return shuffled(stored(cfg, resampled_source(cfg.sources, cfg.weights, shard_rng, context), epoch, context),
                        buffer, buffer_rng)
    urls, sizes = cfg.urls, cfg.sizes
    order = list(range(len(urls)))
    if cfg.shuffle:
        random.Random(derive_seed(cfg.seed, "shard-order", epoch)).shuffle(order)
    ordered = [urls[i] for i in order]
    ordered_sizes = [sizes[i] for i in order] if sizes is not None else None
    members = cfg.selection.members(cfg.seed, epoch, ordered) if cfg.selection is not None else None
    if members is not None:
        pieces = member_pieces(ordered, members, consumer, num_consumers, weights, consumed)
    elif segment == 0:
        pieces = assign_pieces(ordered, ordered_sizes, consumer, num_consumers)
    else:
        pieces = remaining_pieces(ordered, ordered_sizes, consumed, consumer, num_consumers, weights)
    own = shuffled(stored(cfg, pieces_source(pieces, context), epoch, context), buffer, buffer_rng)
    if not fill:
        return own
    return itertools.chain(own, fill_source(ordered, consumer * len(ordered) // num_consumers, context))


def segment_weights(cfg: StreamConfig) -> list[int] | None:
    """Segment 0's split weights: every consumer's batch quota (rank-major), None without quotas.
    Only a split by delivered samples (a placed selection) uses them; the raw split is equal."""
    return list(cfg.quotas) * cfg.world_size if cfg.quotas is not None else None


def stored(cfg: StreamConfig, items: Iterator[Any], epoch: int, context: StreamContext) -> Iterator[Any]:
    """`items` with their reinforced-store rows attached in stream order (`distill.store`), before
    the shuffle buffer mixes shards; unchanged without a store."""
    store = cfg.sample.store
    if store is None:
        return items
    return store.attach(items, epoch, lambda: context.fast_forward)


def consumed_samples(cfg: StreamConfig, epoch: int, history: list[Segment]) -> dict[str, set[int]]:
    """url -> indices of the epoch's samples that the consumers of `history` took (fill repeats
    excluded), by replaying each consumer's stream up to its cursor without decoding."""
    consumed: dict[str, set[int]] = {}
    for index, segment in enumerate(history):
        taken: dict[str, set[int]] = {}
        for consumer, cursor in enumerate(segment.cursors):
            if cursor <= 0:
                continue
            context = StreamContext(member_limit=cfg.sample.member_limit)
            context.fast_forward = True  # headers only, nothing counted
            items = consumer_stream(cfg, epoch, consumer, segment.consumers, index, segment.weights, consumed,
                                    context, fill=True)  # a fill part only matters past the own samples
            position = 0
            for item in items:
                if position >= cursor:
                    break
                if item is CYCLE_END:
                    continue
                position += 1
                if not item.get("__fill__", False):
                    taken.setdefault(item["__url__"], set()).add(item["__index__"])
            close = getattr(items, "close", None)
            if close is not None:
                close()
        for url, indices in taken.items():
            consumed.setdefault(url, set()).update(indices)
    return consumed


def worker_batches(cfg: StreamConfig, epoch: int, worker: int, start: WorkerState,
                   plan: EpochPlan | None = None) -> Iterator[dict[str, Any]]:
    """Batches of logical worker `worker` for `epoch`, continuing from `start` (`plan`: see raw_stream).

    Yields batch dicts (see samples.collate) with an extra `_meta` entry; a final item holding
    only `_meta` reports skips that happened after the last batch.
    """
    consumer = cfg.rank * cfg.workers_per_rank + worker
    tag = consumer_tag(consumer, plan.segment if plan is not None else 0)
    quotas = plan.quotas if plan is not None else cfg.quotas
    quota = quotas[worker] if quotas is not None else None
    if quota is not None and start.batches >= quota:
        return
    selection = cfg.selection
    wanted = (lambda key: selection.delivers(cfg.seed, epoch, key)) if selection is not None else None
    context = StreamContext(start.skips, cfg.sample.member_limit, wanted)
    context.fast_forward = True
    items = iter(raw_stream(cfg, epoch, worker, context, plan))
    position = 0
    while position < start.cursor:  # fast-forward: no decoding
        item = next(items, None)
        if item is None:
            break
        if item is not CYCLE_END:
            position += 1
    context.fast_forward = False
    restore_rng = get_worker_info() is None  # main process: leave the trainer's RNG state alone
    batches, repeated, unselected = start.batches, start.repeated, start.unselected
    pending: list[Sample] = []
    reported = (context.snapshot(), repeated, unselected)
    good_this_cycle = True  # optimistic after a fast-forward: the guards only need to trip eventually
    last_good_draw, patience = None, resample_patience(len(cfg.urls))

    specs: dict[int, SampleSpec] = {}

    def batch_plan(done: int) -> tuple[SampleSpec, int]:
        """The sample spec and size of this worker's batch number `done` (0-based) of the epoch."""
        schedule = cfg.lengths
        if schedule is None:
            return cfg.sample, cfg.batch_size
        offset = sum(cfg.quotas) - sum(quotas) if quotas is not None and cfg.quotas is not None else 0
        length = schedule.length(cfg.seed, epoch, offset + done * cfg.workers_per_rank + worker)
        if length not in specs:
            specs[length] = replace(cfg.sample, image_transform=schedule.transform(length))
        return specs[length], schedule.batch_size_at(length)

    spec, size = batch_plan(batches)

    def meta(has_data: bool) -> dict[str, Any]:
        return {"worker": worker, "epoch": epoch, "cursor": position, "batches": batches,
                "skips": context.snapshot(), "repeated": repeated, "unselected": unselected, "data": has_data}

    for item in items:
        if item is CYCLE_END:
            if not good_this_cycle:
                break  # a whole pass over the data gave nothing usable
            good_this_cycle = False
            continue
        seed = derive_seed(cfg.seed, "sample", epoch, *tag, position)
        position += 1
        fill, draw = item.get("__fill__", False), item.get("__draw__")
        if last_good_draw is None:
            last_good_draw = draw
        if item.get("__unwanted__"):  # not selected or not drawn: judged by its key, its bytes left unread
            unselected += int(not fill)
            if draw is not None and draw - last_good_draw >= patience:
                break
            continue
        try:
            sample = decode_sample(materialize(item), spec, seed, restore_rng, epoch)
        except BadSample as error:
            if not fill:
                context.add(error.reason)
            if draw is not None and draw - last_good_draw >= patience:
                break  # resampling keeps drawing shards with nothing usable in them
            continue
        good_this_cycle, last_good_draw = True, draw
        repeated += int(fill)
        pending.append(sample)
        if len(pending) == size:
            batches += 1
            batch = collate(pending, cfg.tokenize, cfg.mean, cfg.std, cfg.teacher_tokenize, cfg.teacher_mean, cfg.teacher_std)
            batch["_meta"] = meta(True)
            reported = (context.snapshot(), repeated, unselected)
            pending = []
            yield batch
            if quota is not None and batches >= quota:
                return
            spec, size = batch_plan(batches)
    if pending and not cfg.drop_last:
        batches += 1
        batch = collate(pending, cfg.tokenize, cfg.mean, cfg.std, cfg.teacher_tokenize, cfg.teacher_mean, cfg.teacher_std)
        batch["_meta"] = meta(True)
        yield batch
    elif (context.snapshot(), repeated, unselected) != reported:
        yield {"_meta": meta(False)}
