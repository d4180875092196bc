"""Train and eval loaders over WebDataset shards, with exact, resumable stream state.

    loader = build_train_loader(cfg.data, tokenizer, context_length=77, batch_size=256, seed=cfg.seed)
    loader.load_state_dict(saved)              # optional: resume (this rank's state)
    total_steps = loader.steps_per_epoch * epochs
    while loader.epoch < epochs:
        for batch in loader:                   # one epoch (the rest of it after a resume)
            ...                                # pixel_values, input_ids, attention_mask, keys[, labels, views]
            saved = loader.state_dict()        # with every checkpoint, one per rank
            log(loader.skip_counts())          # {reason: count}, cumulative on this rank

Design (pipeline.py has one worker's stream, shards.py the data split):

- Every batch is a deterministic function of (seed, epoch, rank, worker, position in the
  worker's stream): shard order, shard draws, shuffle buffers, caption choice, augmentation.
- Epoch mode splits each epoch exactly over the `world_size * num_workers` consumers (equal
  contiguous index ranges with `sizes.json`, else whole shards, else samples within shards);
  resampled mode draws shards with replacement per consumer, `samples_per_epoch` per epoch.
- The DataLoader hands out work round-robin over its workers and skips finished ones, so the
  sequence of batches a rank sees is fixed by the workers' batch sequences. Each batch carries
  its worker's position; the loader keeps, per worker, the position after the last batch the
  trainer received, the worker due next, and the skip counts: that is `state_dict()`.
- Resume: a fresh DataLoader whose worker `i` plays logical worker `(i + next) % W`, each
  fast-forwarded to its saved position without decoding (local shards: tar headers only).
  The next batches equal those of an uninterrupted run, with any `num_workers` (the same value
  as when the state was saved: the data split depends on it). On another layout (world size,
  workers, batch size), `load_elastic_state(every rank's state)` continues the epoch with the
  samples no rank took yet, each once (elastic.py). The DataLoader gets its own
  torch generator, and in-process loading restores the RNG it touches, so the trainer's RNG
  streams are not disturbed either.

Equal steps per rank. Ranks must run the same number of steps (collectives), so by default each
worker yields a fixed quota of full batches per epoch: `steps_per_epoch = total // (batch_size *
world_size)` split over the workers, with `total = samples_per_epoch` in resampled mode and
the shard sizes (`sizes.json`, else `data.samples_per_epoch`) in epoch mode. Leftover samples
(fewer than a batch per worker) are not seen that epoch; a worker that runs short (bad samples,
missing shards) tops up with repeated samples of the epoch (`repeated_samples()`). With
`exhaust=True` (coverage, evaluation) every sample is yielded exactly once and each worker's
last batch may be partial; ranks may then see different numbers of batches.

NaFlex sequence lengths and token budget (`data.naflex.sequence_lengths`, `token_budget`;
naflex.LengthSchedule): each optimizer step's sequence length is drawn from (seed, epoch, step),
so every rank pads the step's batches to the same L, and with a budget a micro-batch holds
`token_budget // L` samples, the same on every rank. The epoch then has `total // (mean batch x
world_size)` micro-batches per rank (whole optimizer steps): like a selection's epoch, a worker
whose batches happen to be larger than average tops up with repeats, a smaller one leaves
leftovers. A saved state records the schedule; an elastic resume counts the rest of the epoch
in expected samples.

Selection (`data.selection`, selection.py): only the file's samples drawn in the epoch are
delivered; the others are dropped by key before decoding and counted apart from bad data
(`unselected_samples()`). In epoch mode the epoch length comes from the file: `total` is the
expected number of samples drawn per epoch (the sum of the probabilities of the rows in these
shards), the same for every epoch and rank, so the run's length and schedule are known at start.
An epoch's actual draw differs from it by about sqrt(sum p(1-p)) samples (none without balanced
rows): a short epoch tops up with repeats like any short worker, a long one leaves its excess
unseen, as leftovers. With shard + index columns the epoch's samples are split by delivered
samples (equal shares); without them by raw samples (sizes.json or whole shards), which gives
unequal shares when the selection is uneven over the shards.

Skips (`samples.SKIP_REASONS`): missing_image, missing_caption, empty_caption,
bad_caption_encoding, bad_caption, caption_too_large, bad_label, missing_label, metadata_too_large,
corrupt_image, image_too_large, transform_error, not_in_store (per sample) and unreadable_shard,
truncated_shard (per shard event). Nothing is raised for bad data; an epoch without a single
usable sample raises `NoDataError` naming the counts.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..distributed import get_rank, get_world_size
from .class_prompts import ClassPrompts
from .decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_TEXT_BYTES
from .elastic import EpochPlan, Segment
from .pipeline import StreamConfig, WorkerState, worker_batches
from .samples import SampleSpec
from .selection import Selection, read_selection
from ..redact import redact
from .shards import expand_shards, read_shard_sizes, split_evenly
from .tokenize import CaptionTokenizer
from .naflex import LengthSchedule, NaFlexPatchesU8
from .transforms import CLIP_MEAN, CLIP_STD, clip_eval_transform, clip_train_transform

log = logging.getLogger(__name__)

STATE_VERSION = 1


class NoDataError(RuntimeError):
    """The pipeline produced no usable sample in a whole epoch."""


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to their rank, which finishes its step, saves and stops them.

    A launcher signals the whole process tree; a worker dying first would make the rank's
    next batch fetch raise instead of letting it save.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _EpochDataset(IterableDataset):
    """The DataLoader's view: each worker runs its logical worker's stream for one epoch."""

    def __init__(self, cfg: StreamConfig, epoch: int, starts: list[WorkerState], rotation: int,
                 plan: EpochPlan | None = None):
        super().__init__()
        self.cfg, self.epoch, self.starts, self.rotation, self.plan = cfg, epoch, starts, rotation, plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.cfg.workers_per_rank
        return worker_batches(self.cfg, self.epoch, logical, self.starts[logical], self.plan)


class ShardLoader:
    """Iterate one epoch per `for` loop; `state_dict()` / `load_state_dict()` resume exactly.

    steps_per_epoch: batches per epoch on this rank (the same on every rank), or None when it
    is only known at the end (exhaust mode, or epoch mode without sizes on one rank).
    """

    def __init__(
        self,
        cfg: StreamConfig,
        steps_per_epoch: int | None,
        train: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.train = train
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self._finished_skips: dict[str, int] = {}
        self._finished_repeated = 0
        self._finished_unselected = 0
        self._reset_position()

    # ------------------------------------------------------------------ iteration

    def _reset_position(self) -> None:
        self._workers = [WorkerState() for _ in range(self.cfg.workers_per_rank)]
        self._next_worker = 0
        self._batches_in_epoch = 0
        self._plan: EpochPlan | None = None  # set while an epoch continues after an elastic resume

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("this loader's epoch length is unknown (no shard sizes); iterate to the end instead")
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        dataset = _EpochDataset(self.cfg, epoch, [WorkerState.from_dict(w.to_dict()) for w in self._workers],
                                self._next_worker, self._plan)
        if self.cfg.num_workers == 0:
            source: Any = iter(dataset)
        else:
            # Own generator: the DataLoader draws its workers' base seed from it, which would
            # otherwise advance the trainer's global torch RNG (and make a resumed run differ).
            source = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor, persistent_workers=False,  # in order (the default)
                generator=torch.Generator().manual_seed(self.cfg.seed), worker_init_fn=_ignore_stop_signals,
            ))
        try:
            for item in source:
                meta = item.pop("_meta")
                self._workers[meta["worker"]] = WorkerState(meta["cursor"], meta["batches"], meta["skips"], meta["repeated"],
                                                            meta["unselected"])
                self._next_worker = (meta["worker"] + 1) % self.cfg.workers_per_rank
                if not meta["data"]:
                    continue
                self._batches_in_epoch += 1
                if self.steps_per_epoch is not None and self._batches_in_epoch >= self.steps_per_epoch:
                    self._finish_epoch()  # before the yield, so a state saved after this batch says "next epoch"
                    yield item
                    return
                yield item
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self._batches_in_epoch == 0 and self.train:
            raise NoDataError(
                f"the training data gave no usable sample in epoch {epoch} on rank {self.cfg.rank} "
                f"(skipped so far: {self.skip_counts() or 'nothing'}{self._unselected_note()}); check data.train_shards "
                "and the shards' contents."
            )
        if self.steps_per_epoch is not None and self._batches_in_epoch < self.steps_per_epoch:
            log.warning("rank %d: epoch %d ended after %d of %d batches: too little usable data",
                        self.cfg.rank, epoch, self._batches_in_epoch, self.steps_per_epoch)
        self._finish_epoch()

    def _finish_epoch(self) -> None:
        for worker in self._workers:
            for reason, n in worker.skips.items():
                self._finished_skips[reason] = self._finished_skips.get(reason, 0) + n
            self._finished_repeated += worker.repeated
            self._finished_unselected += worker.unselected
        if self.train:
            self.epoch += 1
        self._reset_position()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning on the next iteration."""
        self.epoch = int(epoch)
        self._reset_position()

    # ------------------------------------------------------------------ counters

    def skip_counts(self, all_ranks: bool = False) -> dict[str, int]:
        """Cumulative skipped samples/events by reason, as of the last batch received: this rank's,
        or with `all_ranks` the sum over the process group (a collective: every rank calls it)."""
        totals = dict(self._finished_skips)
        for worker in self._workers:
            for reason, n in worker.skips.items():
                totals[reason] = totals.get(reason, 0) + n
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list[dict[str, int] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, totals)
            totals = {}
            for counts in every:
                for reason, n in (counts or {}).items():
                    totals[reason] = totals.get(reason, 0) + n
        return {reason: n for reason, n in sorted(totals.items()) if n}

    def repeated_samples(self) -> int:
        """Samples delivered a second time within an epoch to keep steps equal across ranks."""
        return self._finished_repeated + sum(w.repeated for w in self._workers)

    def unselected_samples(self, all_ranks: bool = False) -> int:
        """Raw samples read but not delivered because `data.selection` does not select them or did
        not draw them in their epoch (not bad data): this rank's, or with `all_ranks` the sum over
        the process group (a collective: every rank calls it)."""
        total = self._finished_unselected + sum(w.unselected for w in self._workers)
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([total], dtype=torch.float64)
            torch.distributed.all_reduce(count)
            total = int(count.item())
        return total

    def _unselected_note(self) -> str:
        if self.cfg.selection is None:
            return ""
        return (f"; {self.unselected_samples()} samples read were not in data.selection "
                f"'{redact(self.cfg.selection.path)}' or not drawn this epoch")

    # ------------------------------------------------------------------ state

    def _identity(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"resampled": cfg.resampled, "seed": cfg.seed, "rank": cfg.rank, "world_size": cfg.world_size,
                "num_workers": cfg.workers_per_rank, "batch_size": cfg.batch_size}

    def _schedule_identity(self) -> dict[str, Any] | None:
        return self.cfg.lengths.identity() if self.cfg.lengths is not None else None

    def same_schedule(self, state: dict[str, Any]) -> bool:
        """Whether `state` (a `state_dict()`) was saved with this loader's sequence lengths and token budget."""
        return state.get("sequence_schedule") == self._schedule_identity()

    @property
    def expected_batch(self) -> float:
        """Samples per batch: `batch_size`, or with a token budget the mean over the sequence lengths."""
        return self.cfg.lengths.expected_batch if self.cfg.lengths is not None else float(self.cfg.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state of this rank's stream (each rank saves its own)."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "next_worker": self._next_worker,
            "workers": [w.to_dict() for w in self._workers],
            "finished_skips": dict(self._finished_skips),
            "finished_repeated": self._finished_repeated,
            "finished_unselected": self._finished_unselected,
            "epoch_steps": self.steps_per_epoch,
            **({"selection": self._selection_fingerprint()} if self.cfg.selection is not None else {}),
            **({"plan": self._plan.to_dict()} if self._plan is not None else {}),
            **({"sequence_schedule": self._schedule_identity(), "expected_batch": self.expected_batch}
               if self.cfg.lengths is not None else {}),
        }

    def _selection_fingerprint(self) -> dict[str, Any]:
        selection = self.cfg.selection
        return {"rows": selection.rows, "expected": selection.total}

    def _check_selection(self, state: dict[str, Any]) -> None:
        """Warn when the checkpoint was trained on another selection (or none): the rest of its epoch
        is then not the remaining samples of one selection."""
        now = self._selection_fingerprint() if self.cfg.selection is not None else None
        if state.get("selection") != now:
            log.warning("data.selection differs from the checkpoint's (saved %s, now %s): the rest of epoch %d "
                        "follows the new selection, so some samples may repeat or be missed in it",
                        state.get("selection"), now, int(state["epoch"]))

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue exactly where `state` was saved.

        The stream layout must match (seed, mode, rank, world size, workers, batch size). With a
        mismatch, `strict=True` raises ValueError; `strict=False` logs a warning and starts the
        epoch after the saved one from its beginning (no sample of it repeats; the rest of the
        interrupted epoch is skipped).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        self._check_selection(state)
        self._finished_skips = {k: int(v) for k, v in state["finished_skips"].items()}
        self._finished_repeated = int(state.get("finished_repeated", 0))
        self._finished_unselected = int(state.get("finished_unselected", 0))
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if not self.same_schedule(state):
            mismatched["data.naflex sequence_lengths/token_budget"] = (state.get("sequence_schedule"), self._schedule_identity())
        if mismatched:
            details = ", ".join(f"{k}: saved {old}, now {new}" for k, (old, new) in mismatched.items())
            if strict:
                raise ValueError(
                    f"cannot resume the data stream exactly ({details}); use the saved values, "
                    "or load with strict=False to restart at the next epoch."
                )
            log.warning("data stream changed (%s): resuming at the start of epoch %d", details, state["epoch"] + 1)
            self.set_epoch(int(state["epoch"]) + 1)
            return
        self.epoch = int(state["epoch"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._next_worker = int(state["next_worker"])
        self._workers = [WorkerState.from_dict(w) for w in state["workers"]]
        self._plan = EpochPlan.from_dict(state["plan"]) if state.get("plan") is not None else None

    def load_elastic_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Continue the epoch that `states` were saved in, on this loader's (different) layout.

        states: every rank's `state_dict()` of the run that saved them, in rank order. Its epoch
        continues here as a new segment (see elastic.py): in epoch mode the samples no rank took
        yet are split over this run's ranks x workers, each seen once; in resampled mode the new
        consumers draw from generators seeded by (seed, epoch, consumer, segment). The rest of
        the epoch has the saved run's remaining samples, in this layout's batches. Skip and
        repeat counts of the saved run are carried by rank 0. Returns a summary for the log:
        {"epoch", "remaining_batches" (per rank; None when unknown), "segment"}.
        """
        first = states[0]
        if any(s.get("version") != STATE_VERSION for s in states):
            raise ValueError(f"data loader state version {first.get('version')} is not {STATE_VERSION}")
        for key, now in (("seed", self.cfg.seed), ("resampled", self.cfg.resampled)):
            if first.get(key) != now:
                raise ValueError(f"cannot continue the data stream: {key} was {first.get(key)} and is now {now}.")
        if len(states) != int(first["world_size"]):
            raise ValueError(f"the checkpoint holds {len(states)} ranks' data states for a world size of {first['world_size']}")
        if self.cfg.rank == 0:
            self._check_selection(first)
        self.epoch = int(first["epoch"])
        self._reset_position()
        self._finished_skips, self._finished_repeated, self._finished_unselected = {}, 0, 0
        if self.cfg.rank == 0:  # one owner, so the counts are not multiplied by the new world size
            for state in states:
                for counts in [state["finished_skips"], *(w["skips"] for w in state["workers"])]:
                    for reason, n in counts.items():
                        self._finished_skips[reason] = self._finished_skips.get(reason, 0) + int(n)
                self._finished_repeated += int(state.get("finished_repeated", 0))
                self._finished_repeated += sum(int(w.get("repeated", 0)) for w in state["workers"])
                self._finished_unselected += int(state.get("finished_unselected", 0))
                self._finished_unselected += sum(int(w.get("unselected", 0)) for w in state["workers"])
        cursors = [int(w["cursor"]) for state in states for w in state["workers"]]
        if not any(cursors):  # saved at an epoch boundary: the epoch starts normally on the new layout
            return {"epoch": self.epoch, "remaining_batches": self.steps_per_epoch, "segment": 0}
        old_plan = EpochPlan.from_dict(first["plan"]) if first.get("plan") is not None else None
        old_steps = first.get("epoch_steps")
        first_weights = None  # segment 0's: the saved layout's quotas (see pipeline.segment_weights)
        if old_plan is None and old_steps is not None:
            first_weights = split_evenly(int(old_steps), int(first["num_workers"])) * len(states)
        history = (old_plan.history if old_plan is not None else []) + [
            Segment(len(cursors), old_plan.weights if old_plan is not None else first_weights, cursors)]
        old_batch = float(first.get("expected_batch", first["batch_size"]))  # a token budget's mean batch
        if old_steps is None and self.steps_per_epoch is not None:  # a state saved before "epoch_steps" existed
            old_steps = int(self.steps_per_epoch * self.expected_batch * self.cfg.world_size // (old_batch * len(states)))
        weights = quotas = None
        remaining = None
        if old_steps is not None and self.steps_per_epoch is not None:
            samples_left = (int(old_steps) - int(first["batches_in_epoch"])) * old_batch * len(states)
            remaining = int(samples_left / (self.expected_batch * self.cfg.world_size) + 1e-9)
            if self.cfg.lengths is not None:  # whole optimizer steps, so no step spans two sequence lengths
                remaining -= remaining % self.cfg.lengths.grad_accum_steps
            quotas = split_evenly(remaining, self.cfg.workers_per_rank)
            weights = quotas * self.cfg.world_size
            self._batches_in_epoch = self.steps_per_epoch - remaining
        self._plan = EpochPlan(history, weights, quotas)
        return {"epoch": self.epoch, "remaining_batches": remaining, "segment": len(history)}


# ---------------------------------------------------------------------------- builders


def _mean_std(explicit: Sequence[float] | None, fallback: Sequence[float] | None, default: Sequence[float]) -> tuple:
    values = explicit if explicit is not None else fallback if fallback is not None else default
    return tuple(float(v) for v in values)


def _epoch_plan(data_cfg: Any, sizes: list[int] | None, batch_size: int, world_size: int,
                exhaust: bool, selected: float | None = None,
                schedule: LengthSchedule | None = None) -> tuple[int | None, list[int] | None]:
    """(steps per epoch per rank, their split over the workers), or (None, None) when one rank runs
    to the end of data of unknown size (or `exhaust`: every sample once, partial batches).
    selected: the samples a selection delivers per epoch (expected), which sets epoch mode's size.
    schedule: NaFlex sequence lengths (and a token budget): batches of its expected size, whole steps."""
    if data_cfg.resampled:
        if data_cfg.samples_per_epoch is None:
            raise ValueError("data.samples_per_epoch is required with data.resampled: true.")
        total = data_cfg.samples_per_epoch
    else:
        if data_cfg.train_weights is not None:
            log.warning("data.train_weights only applies with data.resampled: true; epoch mode reads every shard once")
        if selected is not None:
            total = int(selected)
        else:
            total = sum(sizes) if sizes is not None else data_cfg.samples_per_epoch
    if not (data_cfg.resampled or not exhaust):
        return None, None
    if total is None and world_size > 1:
        raise ValueError(
            f"epoch mode on {world_size} ranks needs the dataset size to give every rank the same number "
            f"of steps: put a sizes.json next to the shards of '{redact(data_cfg.train_shards)}' or set "
            "data.samples_per_epoch (or use data.resampled: true)."
        )
    if total is None:  # one rank without sizes: run to the end of the data, full batches only
        return None, None
    steps = schedule.batches_per_epoch(total, world_size) if schedule is not None else total // (batch_size * world_size)
    if steps == 0:
        batch = (f"{schedule.expected_batch:g} on average x {schedule.grad_accum_steps} micro-batches"
                 if schedule is not None else str(batch_size))
        raise ValueError(
            f"an epoch of {total} samples is smaller than one global batch ({batch} x {world_size} ranks); "
            f"lower {'data.naflex.token_budget' if schedule is not None and schedule.token_budget else 'the batch size'} "
            "or add data."
        )
    return steps, split_evenly(steps, max(1, data_cfg.num_workers))


def build_train_loader(
    data_cfg: Any,
    tokenizer: Callable[..., Any] | None,
    context_length: int = 77,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    image_transform: Callable | None = None,
    view_transforms: Sequence[Callable] | None = None,
    pixel_values: bool = True,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    exhaust: bool = False,
    caption_key: str = "txt",
    pin_memory: bool = False,
    teacher: Any | None = None,
    class_prompts: ClassPrompts | None = None,
    store: Any | None = None,
    grad_accum_steps: int = 1,
) -> ShardLoader:
    """The training loader for `data_cfg` (a `mmcl.config.DataConfig`).

    tokenizer: `transformers` tokenizer or callable (see tokenize.py); None = image-only shards,
        batches without input_ids/attention_mask and no caption required.
    image_transform: uint8 [3,H,W] -> [3,S,S] for `pixel_values`; default CLIP's RandomResizedCrop
        at `data_cfg.image_size` with `data_cfg.train_crop_scale`, or with `data_cfg.naflex` NaFlex
        patches (`naflex.NaFlexPatchesU8`: pixel_values, pixel_attention_mask, spatial_shapes). `pixel_values=False` drops it.
    view_transforms: e.g. two independent SSL augmentations -> batch["views"] = [v1, v2].
    image_mean / image_std: the image tower's normalisation, used when `data_cfg.image_mean/std`
        are unset; CLIP's when both are None. Applied to uint8 transform outputs, per batch.
    exhaust: every sample once per epoch, partial last batches, no equal-steps guarantee.
    rank / world_size: default to the process group's (single process without one).
    teacher: a `TeacherData` (a distillation teacher's transform, tokenizer, context length,
        mean and std): batches then also hold teacher_pixel_values, teacher_input_ids and
        teacher_attention_mask from the same decoded image and caption.
    class_prompts: captions made from the `.cls` labels (FLYP, `data.captions_from_labels`)
        instead of the `caption_key` files; needs a tokenizer.
    store: a `reinforced.ReinforcedStore` (`distill.store`): `pixel_values` is each sample's stored
        crop of the epoch (not a fresh random crop), and batches hold the teachers' stored features
        (teacher_image_features_<t>, teacher_text_features_<t>); samples not in it are skipped.
    grad_accum_steps: micro-batches per optimizer step. With `data_cfg.naflex.sequence_lengths` or
        `token_budget` the micro-batches of one step share their sequence length (and size), and an
        epoch is whole steps; otherwise unused.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if data_cfg.train_shards is None:
        raise ValueError("data.train_shards is not set; point it at the training shards, e.g. 'data/{00000..00127}.tar'.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sources = expand_shards(data_cfg.train_shards)
    urls = [u for s in sources for u in s]
    naflex = getattr(data_cfg, "naflex", None)
    if image_transform is None and pixel_values and store is None:
        image_transform = (NaFlexPatchesU8(naflex.patch_size, naflex.max_num_patches) if naflex is not None else
                           clip_train_transform(data_cfg.image_size, data_cfg.train_crop_scale))
    if not pixel_values or store is not None:
        image_transform = None  # with a store, the stored crop is the student's view
    schedule = None
    if naflex is not None and isinstance(image_transform, NaFlexPatchesU8) and (
            getattr(naflex, "sequence_lengths", None) is not None or getattr(naflex, "token_budget", None) is not None):
        schedule = LengthSchedule(naflex.patch_size, list(naflex.sequence_lengths or [naflex.max_num_patches]),
                                  naflex.token_budget, int(batch_size), max(1, int(grad_accum_steps)))
    if image_transform is None and not view_transforms and store is None:
        raise ValueError("the loader needs an image transform or view transforms")
    selection = read_selection(data_cfg.selection) if getattr(data_cfg, "selection", None) else None
    placed = selection is not None and selection.groups(urls) is not None
    sizes = None if data_cfg.resampled or placed else read_shard_sizes(urls)
    selected = selection.expected(urls) if selection is not None and not data_cfg.resampled else None
    steps, quotas = _epoch_plan(data_cfg, sizes, batch_size, world_size, exhaust, selected, schedule)
    if selection is not None and rank == 0:
        _describe_selection(selection, urls, placed, selected, steps)
    drop_last = not exhaust  # training batches are full (all ranks gather the same shapes)
    cfg = StreamConfig(
        sources=sources,
        weights=list(data_cfg.train_weights) if data_cfg.resampled and data_cfg.train_weights else None,
        sizes=sizes,
        resampled=bool(data_cfg.resampled),
        shuffle=True,
        shuffle_buffer=int(data_cfg.shuffle_buffer),
        seed=int(seed),
        rank=rank,
        world_size=world_size,
        num_workers=int(data_cfg.num_workers),
        batch_size=int(batch_size),
        quotas=quotas,
        drop_last=drop_last,
        sample=SampleSpec(
            image_transform=image_transform,
            view_transforms=list(view_transforms) if view_transforms else None,
            caption_key=caption_key if tokenizer is not None and class_prompts is None else None,
            max_pixels=int(data_cfg.max_pixels),
            teacher_transform=teacher.transform if teacher is not None else None,
            max_text_bytes=int(data_cfg.max_text_bytes),
            max_image_bytes=int(data_cfg.max_image_bytes),
            class_prompts=class_prompts if tokenizer is not None else None,
            store=store,
        ),
        tokenize=CaptionTokenizer(tokenizer, context_length) if tokenizer is not None else None,
        mean=_mean_std(data_cfg.image_mean, image_mean, CLIP_MEAN),
        std=_mean_std(data_cfg.image_std, image_std, CLIP_STD),
        teacher_tokenize=(CaptionTokenizer(teacher.tokenizer, teacher.context_length)
                          if teacher is not None and tokenizer is not None else None),
        teacher_mean=_mean_std(teacher.mean, None, CLIP_MEAN) if teacher is not None else None,
        teacher_std=_mean_std(teacher.std, None, CLIP_STD) if teacher is not None else None,
        selection=selection,
        lengths=schedule,
    )
    return ShardLoader(cfg, steps, train=True, pin_memory=pin_memory)


def _describe_selection(selection: Selection, urls: list[str], placed: bool, selected: float | None,
                        steps: int | None) -> None:
    """Log what the selection gives (rank 0): rows, expected samples per epoch, how work is split."""
    where = redact(selection.path)
    balanced = len(selection.partial)
    per_epoch = f"{selected:.1f} expected per epoch" if selected is not None else "filtering the resampled stream"
    log.info("data.selection %s: %d selected samples (%d balanced, p < 1), %s%s", where, selection.rows, balanced,
             per_epoch, f", {steps} steps per epoch" if steps is not None else "")
    outside = selection.outside(urls)
    if outside:
        log.warning("data.selection %s: %d of its %d rows name shards that are not in data.train_shards; they are "
                    "not counted in the epoch", where, outside, selection.rows)
    if not placed and selection.placement is not None:
        log.warning("data.selection %s names none of the shards of data.train_shards (moved or renamed?): the "
                    "samples are matched by key and the work is split by raw samples", where)
    elif selection.placement is None:
        log.info("data.selection %s has no shard/index columns: the work is split by raw samples, so ranks get "
                 "unequal shares of the selection where it is uneven over the shards", where)


@dataclass(frozen=True)
class TeacherData:
    """What the loader needs to prepare a distillation teacher's inputs."""

    transform: Callable  # uint8 [3, H, W] -> [3, S_t, S_t]
    tokenizer: Any  # the teacher's tokenizer (see tokenize.py)
    context_length: int
    mean: Sequence[float]
    std: Sequence[float]


def build_eval_loader(
    shards: str,
    tokenizer: Callable[..., Any] | None = None,
    context_length: int = 77,
    *,
    batch_size: int,
    image_size: int = 224,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rank: int | None = None,
    world_size: int | None = None,
    transform: Callable | None = None,
    caption_key: str = "txt",
    pin_memory: bool = False,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> ShardLoader:
    """Evaluation loader: shards in listed order, no shuffling, CLIP's eval transform by default.

    Each sample is yielded once across all ranks (rank r gets its share; the last batches may be
    partial). Batches keep `labels` from `.cls` and, with a tokenizer, `input_ids` /
    `attention_mask` of the first caption plus `captions` (all captions of each image, for
    retrieval). Without a tokenizer, captions are not required (classification shards).
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    sources = expand_shards(shards)
    urls = [u for s in sources for u in s]
    cfg = StreamConfig(
        sources=sources, weights=None, sizes=read_shard_sizes(urls), resampled=False, shuffle=False,
        shuffle_buffer=0, seed=0, rank=rank, world_size=world_size, num_workers=int(num_workers),
        batch_size=int(batch_size), quotas=None, drop_last=False,
        sample=SampleSpec(
            image_transform=transform if transform is not None else clip_eval_transform(image_size),
            caption_key=caption_key if tokenizer is not None else None,
            max_pixels=int(max_pixels),
            all_captions=tokenizer is not None,
            max_text_bytes=int(max_text_bytes),
            max_image_bytes=int(max_image_bytes),
        ),
        tokenize=CaptionTokenizer(tokenizer, context_length) if tokenizer is not None else None,
        mean=_mean_std(image_mean, None, CLIP_MEAN),
        std=_mean_std(image_std, None, CLIP_STD),
    )
    return ShardLoader(cfg, None, train=False, pin_memory=pin_memory)
