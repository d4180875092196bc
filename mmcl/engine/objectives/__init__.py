"""Training objectives: small modules that turn the model's outputs into a loss, and their registry.

    objective = build_objective("simclr", model, cfg)     # cfg: the RunConfig (None: defaults)
    terms = objective(outputs, batch)                     # {"loss": scalar, <metric>: scalar, ...}

Adding an objective: a subclass of `Objective` (base.py; `needs`, `build`, `forward`), one
line in `OBJECTIVES`, and its name in `mmcl.config.KNOWN_OBJECTIVES` (the config module
imports no torch).

`outputs` is the dual encoder's forward on the batch (computed once by the task for all
objectives): `image_features`, `text_features` [B, D] (normalised), `view_features` [2B, W]
(pooled image-tower outputs of the two SSL views, view 1 then view 2), `logit_scale`,
`logit_bias`, plus what objectives add from the batch without gradient (`batch_outputs`: the
distillation teacher's `teacher_image_features`, `teacher_text_features`, `teacher_logit_scale`).
Each objective declares what it reads from the batch (`needs`: "pixel_values", "text", "views",
"teacher"), so the task encodes and the data pipeline produces only
what is used.

| objective | module | reads | state outside the optimizer |
|---|---|---|---|
| clip, siglip | image_text.py | CLIP view, captions | - |
| clip_queue | image_text.py | CLIP view, captions | momentum towers, image and text queues |
| simclr | simclr.py | views | - |
| byol | byol.py | views | EMA target (tower + projector) |
| moco | moco.py | views | key encoder, key queue |
| simsiam | simsiam.py | views | - |
| triplet | triplet.py | views, or CLIP view + captions | - |
| distill | distill.py | CLIP view + captions, the teacher's view + tokens | frozen teacher (only its SHA-256 is saved) |

State outside the optimizer is deliberately not registered as submodules or buffers:
DeepSpeed never sees it, so it is not trained, not cast to bf16/fp16, not partitioned by
ZeRO-3 and not in DeepSpeed's checkpoint. It is the same on every rank; the trainer saves it
(`extra_state`) beside each checkpoint and restores it on resume, and calls `after_step`
(the EMA updates; ZeRO-3 parameters are gathered there) after every optimizer step.
"""
from __future__ import annotations

from collections.abc import Iterable

from mmcl.config import RunConfig
from mmcl.engine.objectives.base import Objective
from mmcl.engine.objectives.byol import BYOLObjective
from mmcl.engine.objectives.distill import DistillObjective
from mmcl.engine.objectives.image_text import ClipQueueObjective, ContrastiveObjective, SigLipObjective
from mmcl.engine.objectives.moco import MoCoObjective
from mmcl.engine.objectives.simclr import SimCLRObjective, simclr_temperature
from mmcl.engine.objectives.simsiam import SimSiamObjective
from mmcl.engine.objectives.triplet import TripletObjective
from mmcl.models import DualEncoder, Gather, no_gather

OBJECTIVES: dict[str, type[Objective]] = {
    "clip": ContrastiveObjective,
    "siglip": SigLipObjective,
    "clip_queue": ClipQueueObjective,
    "simclr": SimCLRObjective,
    "byol": BYOLObjective,
    "moco": MoCoObjective,
    "simsiam": SimSiamObjective,
    "triplet": TripletObjective,
    "distill": DistillObjective,
}


def build_objective(name: str, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
    """The objective `name` for `model`, configured from `cfg` (defaults when None); `chunk_size`
    tiles the image-text losses (`loss.chunk_size`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives are: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name].build(model, cfg, chunk_size)


def loss_chunk_size(cfg: RunConfig, world_size: int) -> int | None:
    """`loss.chunk_size` resolved for a run of `world_size` ranks: the tile side for the
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
    from mmcl.losses.tiled import recommended_chunk_size

    train = cfg.train
    cached = (train.accumulation == "feature_cache" and train.grad_accum_steps > 1
              and all(OBJECTIVES[name].cacheable for name in cfg.objectives))
    local = train.micro_batch_size * (train.grad_accum_steps if cached else 1)
    return recommended_chunk_size(local, local * world_size)


def needs_of(objectives: Iterable[str], cfg: RunConfig | None = None) -> frozenset[str]:
    """What the named objectives read from a batch under `cfg`: "pixel_values", "text", "views", "teacher"."""
    return frozenset().union(*(OBJECTIVES[name].needs_for(cfg) for name in objectives))


__all__ = [
    "OBJECTIVES", "BYOLObjective", "ClipQueueObjective", "ContrastiveObjective", "DistillObjective", "Gather", "MoCoObjective",
    "Objective", "SigLipObjective", "SimCLRObjective", "SimSiamObjective", "TripletObjective", "build_objective",
    "loss_chunk_size", "needs_of", "no_gather", "simclr_temperature",
]
