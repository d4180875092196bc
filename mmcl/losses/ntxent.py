"""NT-Xent (SimCLR's normalised temperature-scaled cross entropy) over 2N views, across ranks.

Two views of each of N images give 2N projections. Each projection is a query whose
positive is the other view of its image and whose negatives are the other 2N - 2 views
(its own column is excluded). The loss is the cross entropy over the 2N - 1 candidates,
averaged over the 2N queries.

Across ranks (the local-loss form of `mmcl.losses.clip`): rank r all-gathers both views'
projections with gradient, scores its 2B local queries against all 2WB columns with labels
offset by r * B, and returns the mean over its 2B queries, L_r. The mean over ranks of L_r
is the single-process loss over the concatenated batch, and with the gather's summing
backward plus data-parallel gradient averaging the parameter gradients are exactly the
single-process ones (same convention as `clip.py`, tested at 2 gloo ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_with_grad, get_rank


def _ntxent_terms(
    z1: Tensor, z2: Tensor, all_z1: Tensor, all_z2: Tensor, temperature: float, label_offset: int
) -> tuple[Tensor, Tensor]:
    """(mean loss over the 2B local queries, number of queries whose positive scores highest)."""
    batch, total = z1.shape[0], all_z1.shape[0]
    queries = torch.cat([z1, z2])  # [2B, D]
    keys = torch.cat([all_z1, all_z2])  # [2N, D]: view-1 block, then view-2 block
    logits = queries @ keys.T / temperature  # [2B, 2N]
    local = torch.arange(batch, device=z1.device) + label_offset
    own = torch.cat([local, local + total])  # each query's own column
    positive = torch.cat([local + total, local])  # the other view of the same image
    rows = torch.arange(2 * batch, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, own] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    loss = F.cross_entropy(logits, positive)
    correct = (logits.detach().argmax(dim=1) == positive).sum()
    return loss, correct


def ntxent_loss(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.1,
    *,
    all_z1: Tensor | None = None,
    all_z2: Tensor | None = None,
    label_offset: int = 0,
) -> Tensor:
    """NT-Xent over the 2B views of one batch.

    z1, z2: [B, D] projections of the first and second view of the same B images (row i of
    each is one image); they are L2-normalised here, so similarities are cosines.
    temperature: the softmax temperature (SimCLR: 0.1-0.5; SLIP: 0.1).
    For the local-loss form pass the normalised gathered [N, D] projections as all_z1/all_z2
    and label_offset = rank * B. Returns a scalar: the mean over the 2B local queries.
    """
    _check_views(z1, z2)
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    all_z1 = z1 if all_z1 is None else all_z1
    all_z2 = z2 if all_z2 is None else all_z2
    loss, _ = _ntxent_terms(z1, z2, all_z1, all_z2, temperature, label_offset)
    return loss


def _check_views(z1: Tensor, z2: Tensor) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"the two views must both be [batch, dim] with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent with negatives from every rank (local-loss form, see the module docstring).

    forward(z1 [B, D], z2 [B, D]) -> {"loss", "view_acc"}: "loss" is this rank's L_r;
    "view_acc" is the fraction of this rank's 2B queries whose positive is their top-scoring
    candidate among all 2WB - 1 (detached).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the NT-Xent temperature must be positive, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        _check_views(z1, z2)
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        all_z1, all_z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        loss, correct = _ntxent_terms(z1, z2, all_z1, all_z2, self.temperature, get_rank() * z1.shape[0])
        return {"loss": loss, "view_acc": correct.float() / (2 * z1.shape[0])}
