"""SimCLR: an MLP projector on the views' pooled features, NT-Xent over the 2N views of all ranks
(beside clip this is SLIP)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mmcl.losses import NTXentLoss
from mmcl.models import DualEncoder, MLPHead
from mmcl.objectives.base import Objective, image_width, sync_batchnorm
from mmcl.objectives.settings import simclr_temperature

if TYPE_CHECKING:
    from mmcl.config import RunConfig


class SimCLRObjective(Objective):
    """SimCLR: projector(pooled view features) -> NT-Xent over 2N views with all ranks' negatives.

    forward -> {"loss", "view_acc"} (see `mmcl.losses.NTXentLoss`).
    """

    name = "simclr"

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                 temperature: float = 0.1, sync_batchnorm: bool = False):
        super().__init__()
        self.head = MLPHead(in_dim, hidden_dim, out_dim, num_layers, sync_batchnorm=sync_batchnorm)
        self.loss = NTXentLoss(temperature)

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        settings = cls.settings_in(cfg)
        return cls(image_width(model), settings.hidden_dim, settings.out_dim, settings.num_layers, simclr_temperature(cfg),
                   sync_batchnorm=sync_batchnorm(cfg))

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        z1, z2 = self.head(outputs["view_features"]).float().chunk(2)
        return self.loss(z1, z2)
