"""MoCo's InfoNCE: queries from the online encoder against keys from the momentum encoder.

Two views of each of B images give queries q1, q2 (query encoder, with gradient) and keys
k1, k2 (momentum key encoder, constants: detached here). All are L2-normalised, so logits
are cosines divided by the temperature T. The loss is symmetric over the view orders:

    L = (ctr(q1, k2) + ctr(q2, k1)) / 2

ctr(q, k) is a cross entropy whose positive for query i is key i of the other view:

* MoCo v3 (no queue): the candidates are the keys of the whole global batch, logits
  q @ all_k.T / T, [B, W*B]; query i's positive is column rank * B + i. With
  scale_by_temperature each ctr is multiplied by 2T, as in MoCo v3's code.
* MoCo v2 (a queue of K past keys [K, D], constant): logits [B, 1 + K] =
  [q_i . k_i, q_i . queue] / T with label 0, the positive being each query's own key.
  scale_by_temperature applies here too when asked for (MoCo v2 does not use it).

Across ranks: keys carry no gradient, so v3 all-gathers them WITHOUT gradient
(`mmcl.distributed.all_gather_no_grad`) and v2 needs no communication at all (the queue
is the same on every rank). In both forms rank r returns L_r, the mean over its B
queries, so the mean over ranks of L_r is the single-process loss over the concatenated
batch. Each rank's loss depends only on its own queries, so rank r's gradient w.r.t. its
queries is dL_r/dq_r = W * dL/dq_r, and data-parallel gradient averaging gives exactly the
single-process parameter gradients (the convention of `clip.py` and `ntxent.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_no_grad, get_rank


def _ctr(
    q: Tensor, k: Tensor, all_k: Tensor, queue: Tensor | None, temperature: float, label_offset: int
) -> tuple[Tensor, Tensor]:
    """(mean cross entropy over the B queries, number whose positive scores highest).

    q, k: [B, D] normalised queries and their keys (k constant); all_k: [N, D] the keys
    of the global batch (used without a queue); queue: [K, D] normalised constant keys.
    """
    if queue is None:
        logits = q @ all_k.T / temperature  # [B, N]
        labels = torch.arange(q.shape[0], device=q.device) + label_offset
    else:
        positive = (q * k).sum(dim=-1, keepdim=True)  # [B, 1]
        logits = torch.cat([positive, q @ queue.T], dim=1) / temperature  # [B, 1 + K]
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    return loss, (logits.detach().argmax(dim=1) == labels).sum()


def _moco_terms(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    all_k1: Tensor,
    all_k2: Tensor,
    queue: Tensor | None,
    temperature: float,
    scale_by_temperature: bool,
    label_offset: int,
) -> tuple[Tensor, Tensor]:
    """(symmetric loss, number of correct queries out of the 2B) for normalised inputs."""
    first, correct_first = _ctr(q1, k2, all_k2, queue, temperature, label_offset)
    second, correct_second = _ctr(q2, k1, all_k1, queue, temperature, label_offset)
    loss = (first + second) / 2
    if scale_by_temperature:
        loss = loss * (2 * temperature)
    return loss, correct_first + correct_second


def _check(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, queue: Tensor | None) -> None:
    shapes = [tuple(t.shape) for t in (q1, q2, k1, k2)]
    if q1.ndim != 2 or any(s != shapes[0] for s in shapes):
        raise ValueError(f"MoCo queries and keys must all be [batch, dim] with one shape, got {shapes}.")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q1.shape[1]):
        raise ValueError(f"the MoCo queue must be [size, {q1.shape[1]}] to match the features, got {tuple(queue.shape)}.")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"the MoCo temperature must be positive, got {temperature}.")


def _prepare(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, queue: Tensor | None):
    """Normalised queries, detached normalised keys, and the detached normalised queue."""
    q1, q2 = F.normalize(q1, dim=-1), F.normalize(q2, dim=-1)
    k1, k2 = F.normalize(k1.detach(), dim=-1), F.normalize(k2.detach(), dim=-1)
    if queue is not None:
        queue = F.normalize(queue.detach().to(device=q1.device, dtype=q1.dtype), dim=-1)
    return q1, q2, k1, k2, queue


def moco_loss(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    queue: Tensor | None = None,
    temperature: float = 0.2,
    scale_by_temperature: bool = False,
    *,
    all_k1: Tensor | None = None,
    all_k2: Tensor | None = None,
    label_offset: int = 0,
) -> Tensor:
    """Symmetric MoCo loss over one batch (see the module docstring).

    q1, q2: [B, D] query-encoder outputs of views 1 and 2; k1, k2: [B, D] momentum
    key-encoder outputs of views 1 and 2 (detached here). All are L2-normalised here.
    queue: None for MoCo v3 (in-batch key negatives), or [K, D] past keys for MoCo v2
    (detached and normalised here; K may be 0).
    For the local-loss v3 form pass the normalised, gathered [N, D] keys as all_k1/all_k2
    and label_offset = rank * B. Returns a scalar: the mean over the B local queries.
    """
    _check(q1, q2, k1, k2, queue)
    _check_temperature(temperature)
    q1, q2, k1, k2, queue = _prepare(q1, q2, k1, k2, queue)
    all_k1 = k1 if all_k1 is None else all_k1.detach()
    all_k2 = k2 if all_k2 is None else all_k2.detach()
    loss, _ = _moco_terms(q1, q2, k1, k2, all_k1, all_k2, queue, temperature, scale_by_temperature, label_offset)
    return loss


class MoCoLoss(nn.Module):
    """MoCo v2 (with a queue) or v3 (keys of every rank as negatives), see the module docstring.

    forward(q1 [B, D], q2 [B, D], k1 [B, D], k2 [B, D], queue [K, D] | None)
    -> {"loss", "acc"}: "loss" is this rank's L_r (its mean over ranks is the global
    loss); "acc" is the fraction of this rank's 2B queries whose positive has the highest
    logit among their candidates (detached).
    """

    def __init__(self, temperature: float = 0.2, scale_by_temperature: bool = False):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.scale_by_temperature = bool(scale_by_temperature)

    def forward(
        self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, queue: Tensor | None = None
    ) -> dict[str, Tensor]:
        _check(q1, q2, k1, k2, queue)
        q1, q2, k1, k2, queue = _prepare(q1, q2, k1, k2, queue)
        if queue is None:
            all_k1, all_k2, offset = all_gather_no_grad(k1), all_gather_no_grad(k2), get_rank() * q1.shape[0]
        else:
            all_k1, all_k2, offset = k1, k2, 0  # unused: the queue supplies the negatives
        loss, correct = _moco_terms(
            q1, q2, k1, k2, all_k1, all_k2, queue, self.temperature, self.scale_by_temperature, offset
        )
        return {"loss": loss, "acc": correct.float() / (2 * q1.shape[0])}
