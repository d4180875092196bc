"""Training objectives: small modules that turn the model's outputs into a loss, and their registry.

    objective = build_objective("simclr", model, cfg)     # cfg: the RunConfig (None: defaults)
    terms = objective(outputs, batch)                     # {"loss": scalar, <metric>: scalar, ...}

Each objective is declared once, by its class (base.py, `Objective`): its name, its settings
dataclass and where those keys live in a run config, what it reads from a batch, whether it
can use cached features, whether it is an image-text objective, its cross-section config rules
and its builder. `OBJECTIVES` below registers the classes; the run config (its sections and
rules), the data pipeline's needs, the trainer's decisions and the docs (`mmcl.docs`) all
read from it. Adding an objective: one objective file here, one loss file in mmcl/losses/,
one entry in `OBJECTIVES`.

`outputs` is the dual encoder's forward on the batch (computed once by the task for all
objectives): `image_features`, `text_features` [B, D] (normalised), `view_features` [2B, W]
(pooled image-tower outputs of the two SSL views, view 1 then view 2), `logit_scale`,
`logit_bias`, plus what objectives add from the batch without gradient (`batch_outputs`: the
distillation teacher's `teacher_image_features`, `teacher_text_features`, `teacher_logit_scale`).

State outside the optimizer is deliberately not registered as submodules or buffers:
DeepSpeed never sees it, so it is not trained, not cast to bf16/fp16, not partitioned by
ZeRO-3 and not in DeepSpeed's checkpoint. It is the same on every rank; the trainer saves it
(`extra_state`) beside each checkpoint and restores it on resume, and calls `after_step`
(the EMA updates; ZeRO-3 parameters are gathered there) after every optimizer step.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from mmcl.engine.objectives.base import Objective
from mmcl.engine.objectives.byol import BYOLObjective
from mmcl.engine.objectives.distill import DistillObjective
from mmcl.engine.objectives.image_text import ClipObjective, ClipQueueObjective, SigLipObjective
from mmcl.engine.objectives.moco import MoCoObjective
from mmcl.engine.objectives.simclr import SimCLRObjective, simclr_temperature
from mmcl.engine.objectives.simsiam import SimSiamObjective
from mmcl.engine.objectives.triplet import TripletObjective
from mmcl.models import DualEncoder, Gather, no_gather

if TYPE_CHECKING:
    from mmcl.config import RunConfig

OBJECTIVES: dict[str, type[Objective]] = {objective.name: objective for objective in (
    ClipObjective, SigLipObjective, ClipQueueObjective, SimCLRObjective, BYOLObjective, MoCoObjective, SimSiamObjective,
    TripletObjective, DistillObjective,
)}


def build_objective(name: str, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
    """The objective `name` for `model`, configured from `cfg` (defaults when None); `chunk_size`
    chunks the image-text losses (`loss.chunk_size`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives are: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name].build(model, cfg, chunk_size)


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
    local = train.micro_batch_size * (train.grad_accum_steps if uses_feature_cache(cfg) else 1)
    return recommended_chunk_size(local, local * world_size)


def uses_feature_cache(cfg: RunConfig) -> bool:
    """Whether a step accumulates by feature caching (`mmcl.engine.feature_cache`): asked for
    (`train.accumulation: feature_cache`, more than one micro-batch) and every objective cacheable."""
    train = cfg.train
    return (train.accumulation == "feature_cache" and train.grad_accum_steps > 1
            and all(OBJECTIVES[name].cacheable for name in cfg.objectives))


def needs_of(objectives: Iterable[str], cfg: RunConfig | None = None) -> frozenset[str]:
    """What the named objectives read from a batch under `cfg`: "pixel_values", "text", "views", "teacher"."""
    return frozenset().union(*(OBJECTIVES[name].needs_for(cfg) for name in objectives))


__all__ = [
    "OBJECTIVES", "BYOLObjective", "ClipObjective", "ClipQueueObjective", "DistillObjective", "Gather", "MoCoObjective",
    "Objective", "SigLipObjective", "SimCLRObjective", "SimSiamObjective", "TripletObjective", "build_objective",
    "loss_chunk_size", "needs_of", "no_gather", "simclr_temperature", "uses_feature_cache",
]
