"""`Run`: everything a running training holds, made by `mmcl.engine.setup.set_up` and advanced by the loop."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.distributed import get_rank, get_world_size
from mmcl.engine.sizes import global_batch

if TYPE_CHECKING:
    import torch

    from mmcl.config import RunConfig
    from mmcl.engine.task import TrainingTask


@dataclass
class Run:
    """Everything a running training holds; `step` and `samples_seen` advance in the loop."""

    cfg: RunConfig
    engine: Any  # deepspeed.DeepSpeedEngine wrapping `task`
    task: TrainingTask
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    loader: Any  # mmcl.data.loader.ShardLoader
    total_steps: int
    feature_cache: bool  # accumulate by feature caching (mmcl.engine.feature_cache), else plainly
    layout: dict[str, Any]  # world size, batch sizes, workers, ZeRO stage (saved with each checkpoint)
    resume_from: tuple[Path, str] | None  # (checkpoints root, tag) to resume, or None
    saved_layout: dict[str, Any] | None  # that checkpoint's layout
    layout_changes: list[str]  # how this launch differs from it (empty: an exact resume)
    started: float = field(default_factory=time.time)
    step: int = 0
    samples_seen: int = 0
    resumed_at: int | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def global_batch(self) -> int:
        return global_batch(self.cfg.train.micro_batch_size, self.cfg.train.grad_accum_steps, self.world_size)
