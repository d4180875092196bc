"""SimSiam: projector + predictor, negative cosine against the stop-gradient projection of the other view."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mmcl.losses.simsiam import SimSiamLoss
from mmcl.models import DualEncoder, MLPHead
from mmcl.objectives.base import Objective, image_width, sync_batchnorm

if TYPE_CHECKING:
    from mmcl.config import RunConfig


class SimSiamObjective(Objective):
    """SimSiam: z = projector(pooled view features), p = predictor(z); the loss is
    -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2. No target network, no negatives: the
    stop-gradient and the predictor prevent collapse. forward -> {"loss", "cos"}.

    The projector is (Linear-BN-ReLU) x (num_layers - 1), then Linear-BN (BatchNorm on its
    output, as in SimSiam); the predictor is a Linear-BN-ReLU-Linear bottleneck.
    """

    name = "simsiam"

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, num_layers: int = 3,
                 predictor_hidden_dim: int = 512, sync_batchnorm: bool = False):
        super().__init__()
        self.projector = MLPHead(in_dim, hidden_dim, out_dim, num_layers, output_norm=True, sync_batchnorm=sync_batchnorm)
        self.predictor = MLPHead(out_dim, predictor_hidden_dim, out_dim, 2, sync_batchnorm=sync_batchnorm)
        self.loss = SimSiamLoss()

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        s = cls.settings_in(cfg)
        return cls(image_width(model), s.hidden_dim, s.out_dim, s.num_layers, s.predictor_hidden_dim,
                   sync_batchnorm=sync_batchnorm(cfg))

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        z = self.projector(outputs["view_features"])
        p1, p2 = self.predictor(z).float().chunk(2)
        z1, z2 = z.float().chunk(2)
        return self.loss(p1, p2, z1, z2)
