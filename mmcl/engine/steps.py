"""Forward/backward of one optimizer step's micro-batches (plain accumulation), and the step itself.

DeepSpeed counts micro-batches by `engine.step()` calls and decides the accumulation boundary
from that count: there ZeRO reduces the gradients, clips them and updates the weights; on
earlier micro-batches `engine.step()` only counts. So a step is

    accumulated = plain_backward(engine, task, micro_batches)   # or feature_cache_backward:
                  # each micro-batch: forward, engine.backward, and engine.step() on all but the last
    optimizer_step(engine, accumulated)                          # the last engine.step(): the update

Non-finite losses are detected on every rank together (an all-reduce), so all ranks skip the
same step. `plain_step` (here) and `mmcl.engine.feature_cache.feature_cache_step` run both halves
(tests and benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Accumulated:
    """What a step's forward/backward left: metrics averaged over its finite micro-batches (None
    when none was finite), how many micro-batch losses were non-finite, and whether gradients
    were accumulated (then the boundary `engine.step()` is due)."""

    metrics: dict[str, Tensor] | None
    nonfinite: int
    backward: bool


def all_finite(value: Tensor) -> bool:
    """True when `value` is finite on every rank."""
    flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    return flag.item() == 0.0


def plain_backward(engine, task, micro_batches: list[dict[str, Tensor]]) -> Accumulated:
    """Forward/backward each micro-batch; negatives come from one micro-batch at a time.

    A non-finite micro-batch contributes no gradient: with one micro-batch per step the whole
    step is skipped (no backward, no optimizer step); with several, it back-propagates an
    exact zero instead, so DeepSpeed's micro-step count stays aligned.
    """
    outputs, nonfinite = [], 0
    for index, batch in enumerate(micro_batches):
        out = engine(batch)
        if all_finite(out["loss"].detach()):
            outputs.append(out)
            engine.backward(out["loss"])  # DeepSpeed divides by the accumulation steps
        elif len(micro_batches) == 1:
            return Accumulated(None, 1, backward=False)
        else:
            nonfinite += 1
            engine.backward(engine(batch, task.zero_loss)["loss"])
        if index < len(micro_batches) - 1:
            engine.step()  # counts the micro-batch; the update waits for the last one
    metrics = {key: torch.stack([o[key].detach().float() for o in outputs]).mean() for key in outputs[0]} if outputs else None
    return Accumulated(metrics, nonfinite, backward=True)


def optimizer_step(engine, accumulated: Accumulated) -> bool:
    """The step's last `engine.step()`, at the accumulation boundary: ZeRO reduces, clips and updates
    (nothing when no gradient was accumulated). True when the step had a finite loss."""
    if accumulated.backward:
        engine.step()
    return accumulated.metrics is not None


def plain_step(engine, micro_batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor] | None, int]:
    """One whole optimizer step with plain accumulation: (metrics or None, non-finite micro-batches)."""
    accumulated = plain_backward(engine, engine.module, micro_batches)
    optimizer_step(engine, accumulated)
    return accumulated.metrics, accumulated.nonfinite

