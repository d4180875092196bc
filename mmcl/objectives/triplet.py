"""Triplet margin loss with negatives mined from the global batch, on two views or on image-text pairs."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mmcl.losses import TripletLoss
from mmcl.models import DualEncoder, MLPHead
from mmcl.objectives.base import Objective, image_width, sync_batchnorm

if TYPE_CHECKING:
    from mmcl.config import RunConfig


class TripletObjective(Objective):
    """Triplet loss (`mmcl.losses.TripletLoss`: cosine distance, batch-hard or semi-hard mining
    over the pairs of every rank).

    pairs "views": anchors and positives are a projector's outputs of the two views of each
    image; pairs "image_text": the model's normalised image and text features (each image's
    caption is its positive, the other captions of the global batch its candidate negatives).
    forward -> {"loss", "active"} (the fraction of triplets with a positive loss).
    """

    name = "triplet"

    def __init__(self, pairs: str = "views", margin: float = 0.2, mining: str = "semi_hard", symmetric: bool = True,
                 in_dim: int | None = None, hidden_dim: int = 2048, out_dim: int = 128, sync_batchnorm: bool = False):
        super().__init__()
        self.pairs = pairs
        self.head = MLPHead(in_dim, hidden_dim, out_dim, 2, sync_batchnorm=sync_batchnorm) if pairs == "views" else None
        self.loss = TripletLoss(margin, mining, symmetric)

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        s = cls.settings_in(cfg)
        return cls(s.pairs, s.margin, s.mining, s.symmetric, image_width(model) if s.pairs == "views" else None,
                   s.hidden_dim, s.out_dim, sync_batchnorm=sync_batchnorm(cfg))

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        if self.head is None:
            return self.loss(outputs["image_features"], outputs["text_features"])
        anchors, positives = self.head(outputs["view_features"]).float().chunk(2)
        return self.loss(anchors, positives)
