"""Triplet margin loss with in-batch negative mining, across ranks.

Row i of anchors and positives is a pair (two views of one image, or an image and its
caption). Features are L2-normalised and the distance is the cosine distance

    d(a, x) = 1 - cos(a, x)          (0 <= d <= 2)

The candidate negatives of anchor i are all positives of the global batch except its own
pair, p_j for j != i. One negative n_i is mined per anchor:

* "batch_hard": the hardest negative, the one with the smallest d(a_i, n).
* "semi_hard" (FaceNet): among the negatives with d(a_i, p_i) < d(a_i, n) <
  d(a_i, p_i) + margin, the one with the smallest d(a_i, n). Where no negative lies in
  that band, this falls back to the hardest negative (as for "batch_hard").

The per-anchor loss is relu(d(a_i, p_i) - d(a_i, n_i) + margin), averaged over anchors.
The mining picks an index; the gradient flows through the chosen d(a_i, n_i) only. With
symmetric=True the other direction (positives as anchors, all anchors as candidate
negatives) is added and the two directions are averaged.

Across ranks (the local-loss form of `mmcl.losses.clip` and `ntxent`): rank r all-gathers
the positives (and, when symmetric, the anchors) with gradient, mines the negatives of its
B local anchors among all W*B - 1 candidates (own pair at column r * B + i excluded) and
returns the mean over its B anchors, L_r. The mined negatives are those of the
single-process batch, so the mean over ranks of L_r is the loss over the concatenated
batch, and with the gather's summing backward plus data-parallel gradient averaging the
parameter gradients are exactly the single-process ones (tested at 2 gloo ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_with_grad, get_rank

MININGS = ("batch_hard", "semi_hard")


def _direction(anchors: Tensor, candidates: Tensor, margin: float, mining: str, label_offset: int) -> tuple[Tensor, Tensor]:
    """(per-anchor losses [B], number of anchors with a positive loss) for one direction.

    anchors: [B, D] normalised local anchors; candidates: [N, D] normalised pair partners
    of the global batch, anchor i's own partner at row label_offset + i (its positive).
    """
    batch = anchors.shape[0]
    rows = torch.arange(batch, device=anchors.device)
    own = rows + label_offset
    distances = 1 - anchors @ candidates.T  # [B, N]
    positive = distances[rows, own]  # [B]
    with torch.no_grad():
        d = distances.detach()
        negative_mask = torch.ones_like(d, dtype=torch.bool)
        negative_mask[rows, own] = False
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        hardest = torch.where(negative_mask, d, inf).argmin(dim=1)
        if mining == "semi_hard":
            d_ap = d[rows, own].unsqueeze(1)
            band = negative_mask & (d > d_ap) & (d < d_ap + margin)
            semi_hard = torch.where(band, d, inf).argmin(dim=1)
            chosen = torch.where(band.any(dim=1), semi_hard, hardest)
        else:
            chosen = hardest
    losses = F.relu(positive - distances[rows, chosen] + margin)
    return losses, (losses.detach() > 0).sum()


def _triplet_terms(
    anchors: Tensor,
    positives: Tensor,
    all_anchors: Tensor,
    all_positives: Tensor,
    margin: float,
    mining: str,
    symmetric: bool,
    label_offset: int,
) -> tuple[Tensor, Tensor, int]:
    """(mean loss over the local terms, number of active terms, number of terms)."""
    losses, active = _direction(anchors, all_positives, margin, mining, label_offset)
    if not symmetric:
        return losses.mean(), active, anchors.shape[0]
    reverse, reverse_active = _direction(positives, all_anchors, margin, mining, label_offset)
    return (losses.mean() + reverse.mean()) / 2, active + reverse_active, 2 * anchors.shape[0]


def _check_pairs(anchors: Tensor, positives: Tensor) -> None:
    if anchors.ndim != 2 or anchors.shape != positives.shape:
        raise ValueError(f"anchors and positives must both be [batch, dim] with the same shape, got {tuple(anchors.shape)} and {tuple(positives.shape)}.")


def _check_options(margin: float, mining: str) -> None:
    if margin < 0:
        raise ValueError(f"the triplet margin must be non-negative, got {margin}.")
    if mining not in MININGS:
        raise ValueError(f"triplet mining must be one of {', '.join(MININGS)}, got {mining!r}.")


def _check_global_batch(total: int) -> None:
    if total < 2:
        raise ValueError(f"the triplet loss needs at least 2 pairs in the global batch to have a negative, got {total}.")


def triplet_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 0.2,
    mining: str = "batch_hard",
    symmetric: bool = True,
    *,
    all_anchors: Tensor | None = None,
    all_positives: Tensor | None = None,
    label_offset: int = 0,
) -> Tensor:
    """Triplet margin loss with in-batch mining (see the module docstring).

    anchors, positives: [B, D], row i of each is a pair; L2-normalised here.
    margin: the margin of relu(d(a, p) - d(a, n) + margin) in cosine distance (0 to 2).
    mining: "batch_hard" or "semi_hard"; symmetric: also use the positives as anchors.
    For the local-loss form pass the normalised gathered [N, D] features as
    all_anchors/all_positives and label_offset = rank * B. Returns a scalar: the mean
    over the local terms.
    """
    _check_pairs(anchors, positives)
    _check_options(margin, mining)
    anchors, positives = F.normalize(anchors, dim=-1), F.normalize(positives, dim=-1)
    all_anchors = anchors if all_anchors is None else all_anchors
    all_positives = positives if all_positives is None else all_positives
    _check_global_batch(all_positives.shape[0])
    loss, _, _ = _triplet_terms(anchors, positives, all_anchors, all_positives, margin, mining, symmetric, label_offset)
    return loss


class TripletLoss(nn.Module):
    """Triplet loss whose negatives come from every rank (local-loss form, see the module docstring).

    forward(anchors [B, D], positives [B, D]) -> {"loss", "active"}: "loss" is this rank's
    L_r (its mean over ranks is the global loss); "active" is the fraction of this rank's
    terms (B, or 2B when symmetric) with a positive loss (detached).
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard", symmetric: bool = True):
        super().__init__()
        _check_options(margin, mining)
        self.margin = float(margin)
        self.mining = mining
        self.symmetric = bool(symmetric)

    def forward(self, anchors: Tensor, positives: Tensor) -> dict[str, Tensor]:
        _check_pairs(anchors, positives)
        anchors, positives = F.normalize(anchors, dim=-1), F.normalize(positives, dim=-1)
        all_positives = all_gather_with_grad(positives)
        _check_global_batch(all_positives.shape[0])
        all_anchors = all_gather_with_grad(anchors) if self.symmetric else anchors
        loss, active, terms = _triplet_terms(
            anchors, positives, all_anchors, all_positives, self.margin, self.mining, self.symmetric,
            get_rank() * anchors.shape[0],
        )
        return {"loss": loss, "active": active.float() / terms}
