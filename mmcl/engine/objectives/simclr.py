"""SimCLR: an MLP projector on the views' pooled features, NT-Xent over the 2N views of all ranks
(beside clip this is SLIP)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from mmcl.coerce import count, positive
from mmcl.engine.objectives.base import Objective, image_width, sync_batchnorm
from mmcl.losses import NTXentLoss
from mmcl.models import DualEncoder, MLPHead

if TYPE_CHECKING:
    from mmcl.config import RunConfig


@dataclass
class SimCLRConfig:
    """SimCLR: an MLP projector on the pooled image-tower features and NT-Xent over 2N views."""

    temperature: float | None = positive(None)  # NT-Xent temperature; None = 0.1 beside clip/siglip (SLIP), 0.2 alone
    hidden_dim: int = count(2048)  # projector hidden width
    out_dim: int = count(128)  # projector output width
    num_layers: int = count(2)  # projector depth (SimCLR 2, SLIP 3)


class SimCLRObjective(Objective):
    """SimCLR: projector(pooled view features) -> NT-Xent over 2N views with all ranks' negatives.

    forward -> {"loss", "view_acc"} (see `mmcl.losses.NTXentLoss`).
    """

    name = "simclr"
    settings = SimCLRConfig
    settings_key = "ssl.simclr"
    needs = frozenset({"views"})

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


def simclr_temperature(cfg: RunConfig | None) -> float:
    """ssl.simclr.temperature, or its default: 0.1 beside an image-text objective (SLIP), 0.2 alone."""
    if cfg is not None and cfg.ssl.simclr.temperature is not None:
        return cfg.ssl.simclr.temperature
    from mmcl.engine.objectives import OBJECTIVES

    joint = cfg is not None and any(OBJECTIVES[name].image_text for name in cfg.objectives)
    return 0.1 if joint else 0.2
