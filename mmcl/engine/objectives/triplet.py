"""Triplet margin loss with negatives mined from the global batch, on two views or on image-text pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from mmcl.coerce import ConfigError, count, nonnegative
from mmcl.engine.objectives.base import Objective, image_width, sync_batchnorm
from mmcl.losses import TripletLoss
from mmcl.models import DualEncoder, MLPHead

if TYPE_CHECKING:
    from mmcl.config import RunConfig


@dataclass
class TripletConfig:
    """Triplet margin loss with negatives mined from the global batch (all ranks)."""

    pairs: Literal["views", "image_text"] = "views"  # two views of an image, or an image and its caption
    margin: float = nonnegative(0.2)  # on the cosine distance 1 - cos
    mining: Literal["batch_hard", "semi_hard"] = "semi_hard"  # hardest negative, or FaceNet's semi-hard one
    symmetric: bool = True  # also mine with the positives as anchors
    hidden_dim: int = count(2048)  # projector of the views (pairs: views)
    out_dim: int = count(128)  # projector output width (pairs: views)


class TripletObjective(Objective):
    """Triplet loss (`mmcl.losses.TripletLoss`: cosine distance, batch-hard or semi-hard mining
    over the pairs of every rank).

    pairs "views": anchors and positives are a projector's outputs of the two views of each
    image; pairs "image_text": the model's normalised image and text features (each image's
    caption is its positive, the other captions of the global batch its candidate negatives).
    forward -> {"loss", "active"} (the fraction of triplets with a positive loss).
    """

    name = "triplet"
    settings = TripletConfig
    settings_key = "ssl.triplet"
    needs = frozenset({"views"})

    def __init__(self, pairs: str = "views", margin: float = 0.2, mining: str = "semi_hard", symmetric: bool = True,
                 in_dim: int | None = None, hidden_dim: int = 2048, out_dim: int = 128, sync_batchnorm: bool = False):
        super().__init__()
        self.pairs = pairs
        self.head = MLPHead(in_dim, hidden_dim, out_dim, 2, sync_batchnorm=sync_batchnorm) if pairs == "views" else None
        self.loss = TripletLoss(margin, mining, symmetric)

    @classmethod
    def needs_for(cls, cfg: RunConfig | None) -> frozenset[str]:
        if cfg is not None and cfg.ssl.triplet.pairs == "image_text":
            return frozenset({"pixel_values", "text"})
        return cls.needs

    @classmethod
    def check(cls, cfg: RunConfig, source: str) -> None:
        if cls.name in cfg.objectives and cfg.ssl.triplet.pairs == "image_text" and cfg.model.text is None:
            raise ConfigError(f"{source}: 'ssl.triplet.pairs: image_text' needs a text tower ('model.text').")

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        s = cls.settings_in(cfg)
        objective = cls(s.pairs, s.margin, s.mining, s.symmetric, image_width(model) if s.pairs == "views" else None,
                        s.hidden_dim, s.out_dim, sync_batchnorm=sync_batchnorm(cfg))
        objective.needs = cls.needs_for(cfg)
        return objective

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        if self.head is None:
            return self.loss(outputs["image_features"], outputs["text_features"])
        anchors, positives = self.head(outputs["view_features"]).float().chunk(2)
        return self.loss(anchors, positives)
