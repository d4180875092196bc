"""BYOL: online tower + projector + predictor regress an EMA target's projection of the other view."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmcl.losses import BYOLLoss
from mmcl.models import DualEncoder, Gather, MLPHead, MomentumEncoder, no_gather
from mmcl.objectives.base import Objective, encode_with, image_width, split_legacy_state, sync_batchnorm

if TYPE_CHECKING:
    from mmcl.config import RunConfig


class BYOLObjective(Objective):
    """BYOL: predictor(projector(online view features)) regresses the target's projection of the other view.

    The target (copies of the image tower and the projector, `mmcl.models.MomentumEncoder`)
    encodes the same views without gradient, in the online network's train/eval modes, with
    the online pooling. forward -> {"loss", "cos"} (see `mmcl.losses.BYOLLoss`);
    `after_step` -> {"momentum"}. Saved as `momentum.*` in the checkpoint's task state.
    """

    name = "byol"

    def __init__(self, model: DualEncoder, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256,
                 base_momentum: float = 0.99, final_momentum: float = 1.0, sync_batchnorm: bool = False):
        super().__init__()
        self.projector = MLPHead(in_dim, hidden_dim, out_dim, 2, sync_batchnorm=sync_batchnorm)
        self.predictor = MLPHead(out_dim, hidden_dim, out_dim, 2, sync_batchnorm=sync_batchnorm)
        self.loss = BYOLLoss()
        # Plain attributes, not submodules: hidden from DeepSpeed (see mmcl.models.ema).
        object.__setattr__(self, "pooling", model.image_pooling)
        object.__setattr__(self, "momentum", MomentumEncoder({"tower": model.image_tower, "projector": self.projector},
                                                             base_momentum, final_momentum))

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        settings = cls.settings_in(cfg)
        return cls(model, image_width(model), settings.hidden_dim, settings.out_dim, settings.base_momentum,
                   settings.final_momentum, sync_batchnorm=sync_batchnorm(cfg))

    def parameter_pairs(self) -> Iterator[tuple[Tensor, nn.Parameter]]:
        """(target tensor, online parameter) pairs, matched by name."""
        return self.momentum.pairs()

    def encode_target(self, views: list[Tensor]) -> Tensor:
        """views: V batches [B, 3, H, W] -> target projections [V*B, out_dim] (float32, no gradient)."""
        images = torch.cat(list(views))
        with self.momentum.ready(images) as target:
            return encode_with(target, self.pooling, images)

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        p1, p2 = self.predictor(self.projector(outputs["view_features"])).float().chunk(2)
        t1, t2 = self.encode_target(batch["views"]).chunk(2)
        return self.loss(p1, p2, t1, t2)

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        return {"momentum": self.momentum.update(step, total_steps, gather)}

    def extra_state(self) -> dict[str, Tensor]:
        return {f"momentum.{name}": tensor for name, tensor in self.momentum.state_dict().items()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.momentum.load_state_dict(split_legacy_state(state, "momentum", "target"), "BYOL momentum copy")
