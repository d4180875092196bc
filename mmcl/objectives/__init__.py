"""Training objectives: small modules that turn the model's outputs into a loss, and their registry.

    objective = build_objective("simclr", model, cfg)     # cfg: the RunConfig (None: defaults)
    terms = objective(outputs, batch)                     # {"loss": scalar, <metric>: scalar, ...}

Each objective is declared once, torch-free, by an `ObjectiveSpec` in `settings.py`: its name,
its settings dataclass and where those keys live in a run config, what it reads from a batch,
whether it can use cached features, whether it is an image-text objective, its cross-section
config rules and the module that builds it. `OBJECTIVES` registers the declarations; the run
config (`mmcl.config`, without importing torch), the data pipeline's needs, the trainer's
decisions and the docs (`mmcl.docs`) all read from it. The `nn.Module` of each objective lives
in its own module here (`simclr.py`, ...; the teacher of `distill` in `teacher.py`), imported
only when `build_objective` builds it. This package's `__init__` and `settings.py` import no
torch. Adding an objective: its settings dataclass and `ObjectiveSpec` in `settings.py` (and an
entry in `OBJECTIVES`), its module here, its loss in mmcl/losses/, and its settings' field in
the run config's section (`mmcl.config`).

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

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mmcl.objectives.settings import OBJECTIVES, ObjectiveSpec, simclr_temperature

if TYPE_CHECKING:
    from mmcl.config import RunConfig
    from mmcl.models import DualEncoder
    from mmcl.objectives.base import Objective


def build_objective(name: str, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
    """The objective `name` for `model`, configured from `cfg` (defaults when None); `chunk_size`
    chunks the image-text losses (`loss.chunk_size`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives are: {', '.join(OBJECTIVES)}.")
    spec = OBJECTIVES[name]
    module, _, cls = spec.builder.partition(":")
    objective = getattr(importlib.import_module(module), cls).build(model, cfg, chunk_size)
    objective.needs, objective.cacheable = spec.needs_for(cfg), spec.cacheable
    return objective


def uses_feature_cache(cfg: RunConfig) -> bool:
    """Whether a step accumulates by feature caching (`mmcl.engine.feature_cache`): asked for
    (`train.accumulation: feature_cache`, more than one micro-batch) and every objective cacheable."""
    train = cfg.train
    return (train.accumulation == "feature_cache" and train.grad_accum_steps > 1
            and all(OBJECTIVES[name].cacheable for name in cfg.objectives))


def needs_of(objectives: Iterable[str], cfg: RunConfig | None = None) -> frozenset[str]:
    """What the named objectives read from a batch under `cfg`: "pixel_values", "text", "views", "teacher"."""
    return frozenset().union(*(OBJECTIVES[name].needs_for(cfg) for name in objectives))


__all__ = ["OBJECTIVES", "ObjectiveSpec", "build_objective", "needs_of", "simclr_temperature", "uses_feature_cache"]
