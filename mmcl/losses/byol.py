"""BYOL's regression loss: predictions of one view against the target projections of the other.

For predictions p and target projections t of the same images, 2 - 2 cos(p, t) is the
squared distance of the unit vectors. BYOL symmetrises over the view orders:

    L = mean_i [2 - 2 cos(p1_i, t2_i)] + mean_i [2 - 2 cos(p2_i, t1_i)]      (0 <= L <= 8)

(the sum of the two orders, as in the paper and solo-learn). The targets are detached:
they come from the EMA target network, which gets no gradient.

Across ranks nothing needs gathering: each image's term involves only its own views. Rank r
returns the mean over its B images, L_r, so the mean over ranks is the loss over the
concatenated batch and data-parallel gradient averaging gives its exact gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _regression(p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of 2 - 2 cos(p_i, t_i), mean cosine) over the rows of [B, D] tensors."""
    cosine = (F.normalize(p, dim=-1) * F.normalize(t.detach(), dim=-1)).sum(dim=-1)
    return (2 - 2 * cosine).mean(), cosine.detach().mean()


def _check(*tensors: Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in tensors):
        raise ValueError(f"BYOL predictions and targets must all be [batch, dim] with one shape, got {[tuple(t.shape) for t in tensors]}.")


def byol_loss(p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """Symmetric BYOL loss (see the module docstring).

    p1, p2: [B, D] online predictions of view 1 and view 2; t1, t2: [B, D] target
    projections of view 1 and view 2 (detached here). Normalised here. Returns a scalar.
    """
    _check(p1, p2, t1, t2)
    return _regression(p1, t2)[0] + _regression(p2, t1)[0]


class BYOLLoss(nn.Module):
    """forward(p1, p2, t1, t2, all [B, D]) -> {"loss", "cos"}: "loss" is this rank's L_r; "cos"
    is the mean cosine between predictions and their targets (1 = perfect prediction)."""

    def forward(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> dict[str, Tensor]:
        _check(p1, p2, t1, t2)
        first, cos_first = _regression(p1, t2)
        second, cos_second = _regression(p2, t1)
        return {"loss": first + second, "cos": (cos_first + cos_second) / 2}
