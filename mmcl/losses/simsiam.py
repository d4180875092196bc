"""SimSiam's loss: negative cosine between the predictions of one view and the stop-gradient
projections of the other.

For predictions p1, p2 and projections z1, z2 of two views of the same B images:

    L = -( mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i)) ) / 2      (-1 <= L <= 1)

sg is the stop-gradient: z1 and z2 are detached, so the gradient reaches the encoder only
through the predictor's branch (SimSiam's key ingredient against collapse).

Across ranks nothing needs gathering: each image's term involves only its own views. Rank
r returns the mean over its B images, L_r, so the mean over ranks is the loss over the
concatenated batch and data-parallel gradient averaging gives its exact gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _cosine(p: Tensor, z: Tensor) -> Tensor:
    """Per-row cos(p_i, sg(z_i)) of [B, D] tensors, [B]."""
    return (F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(dim=-1)


def _check(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in tensors):
        raise ValueError(f"SimSiam predictions and projections must all be [batch, dim] with one shape, got {[tuple(t.shape) for t in tensors]}.")


def _simsiam_terms(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, detached mean cosine) for [B, D] inputs."""
    cosine = (_cosine(p1, z2).mean() + _cosine(p2, z1).mean()) / 2
    return -cosine, cosine.detach()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric SimSiam loss (see the module docstring).

    p1, p2: [B, D] predictor outputs of view 1 and view 2; z1, z2: [B, D] projections of
    view 1 and view 2 (detached here). Normalised here. Returns a scalar in [-1, 1].
    """
    _check(p1, p2, z1, z2)
    return _simsiam_terms(p1, p2, z1, z2)[0]


class SimSiamLoss(nn.Module):
    """forward(p1, p2, z1, z2, all [B, D]) -> {"loss", "cos"}: "loss" is this rank's L_r; "cos"
    is the mean cosine between predictions and their stop-gradient targets (= -loss, detached)."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        _check(p1, p2, z1, z2)
        loss, cosine = _simsiam_terms(p1, p2, z1, z2)
        return {"loss": loss, "cos": cosine}
