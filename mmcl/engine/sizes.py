"""The sizes a run derives from its config and its number of ranks, each computed here once.

    global_batch(micro_batch_size, grad_accum_steps, world_size)   # samples per optimizer step
    micro_batch(cfg)                         # samples per micro-batch per rank (a token budget's mean)
    steps_per_epoch(loader, cfg)             # optimizer steps in one epoch of the loader
    loss_chunk_size(cfg, world_size)         # the image-text losses' chunk side, or None (dense)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mmcl.engine.runtime import TrainingError
from mmcl.objectives import uses_feature_cache

if TYPE_CHECKING:
    from mmcl.config import RunConfig
    from mmcl.data.loader import ShardLoader


def global_batch(micro_batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    """Samples per optimizer step: `micro_batch_size` per rank and micro-step x `grad_accum_steps` x `world_size` ranks."""
    return micro_batch_size * grad_accum_steps * world_size


def micro_batch_sizes(cfg: RunConfig) -> list[int]:
    """The micro-batch sizes a step may have per rank: [train.micro_batch_size], or with
    data.naflex.token_budget `token_budget // L` for each of data.naflex.sequence_lengths (else max_num_patches)."""
    naflex = cfg.data.naflex
    if naflex is None or naflex.token_budget is None:
        return [cfg.train.micro_batch_size]
    return [naflex.token_budget // length for length in naflex.sequence_lengths or [naflex.max_num_patches]]


def micro_batch(cfg: RunConfig) -> int:
    """Samples per micro-batch per rank as the layout records it: train.micro_batch_size, or with a token
    budget the mean over the sequence lengths (rounded), which a changed budget or length list changes."""
    sizes = micro_batch_sizes(cfg)
    return round(sum(sizes) / len(sizes))


def steps_per_epoch(loader: ShardLoader, cfg: RunConfig) -> int:
    """Optimizer steps in one epoch (micro-batches per rank per epoch // accumulation)."""
    if loader.steps_per_epoch is None:
        raise TrainingError(
            "the epoch length is unknown (no sizes.json beside the shards); set train.steps or data.samples_per_epoch."
        )
    return loader.steps_per_epoch // cfg.train.grad_accum_steps


def loss_chunk_size(cfg: RunConfig, world_size: int) -> int | None:
    """`loss.chunk_size` resolved for a run of `world_size` ranks: the chunk side for the
    image-text losses, or None (dense).

    "auto" asks `recommended_chunk_size` about one loss evaluation: micro_batch_size local
    rows (times grad_accum_steps when the step caches features, which evaluates the loss
    once over all micro-batches) against world_size times as many columns. clip_queue
    always computes densely.
    """
    setting = cfg.loss.chunk_size
    if setting != "auto":
        return setting
    if "clip_queue" in cfg.objectives:
        return None
    from mmcl.losses.chunked import recommended_chunk_size

    train = cfg.train
    largest = max(micro_batch_sizes(cfg))  # a token budget's shortest sequence length has the most rows
    local = global_batch(largest, train.grad_accum_steps if uses_feature_cache(cfg) else 1, 1)
    return recommended_chunk_size(local, global_batch(local, 1, world_size))
