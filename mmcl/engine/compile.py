"""`train.compile`: the towers run through `torch.compile` (inductor) under the DeepSpeed engine.

What is compiled is each tower's forward, in place (`nn.Module.compile`): parameter names,
checkpoints, ZeRO's partitioning and the export are untouched, and everything around the
towers (pooling, projections, the all-gathers and the loss, DeepSpeed's engine) stays eager,
so collectives never enter a graph. The projections and the loss are a small share of a
step; the towers are nearly all of it.

Combinations that cannot work are refused before any process group exists (`check_compile`),
in one sentence, rather than failing in the first step.
"""
from __future__ import annotations

import shutil
from typing import Any

import torch

from mmcl.config import RunConfig
from mmcl.engine.runtime import TrainingError


def check_compile(cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    """Raise `TrainingError` when `train.compile: true` cannot work with the rest of the run.

    Checked and found to work (first losses equal to eager): ZeRO-1/2, feature-cache
    accumulation (two graphs: the no-grad caching pass and the re-encoding pass), gradient
    checkpointing. ZeRO-3 gives equal losses too, but its per-module hooks make dynamo
    recompile past its limit and fall back to eager: refused rather than silently slow.
    """
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise TrainingError(
            "train.compile does not work with ZeRO stage 3 (its per-module parameter-gathering hooks split the "
            "towers into graphs that recompile past torch.compile's limit and fall back to eager); use ZeRO stage "
            "1 or 2, or set train.compile: false."
        )
    if not torch.cuda.is_available() and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise TrainingError(
            "train.compile on the CPU needs a C++ compiler (g++) for inductor's kernels; install one "
            "(apt-get install g++) or set train.compile: false."
        )


def compile_towers(model: torch.nn.Module) -> list[str]:
    """Compile `model`'s towers in place (inductor); returns the names of what was compiled."""
    compiled = []
    for name in ("image_tower", "text_tower"):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.compile()
            compiled.append(name)
    return compiled
