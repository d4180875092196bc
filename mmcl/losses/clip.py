"""Symmetric InfoNCE (CLIP) loss, single-process and across ranks (local-loss form).

Distributed gradient convention (shared with `mmcl.losses.siglip`): rank r computes
L_r, the mean over its B local rows scored against all W*B gathered columns. The global
loss L = mean_r L_r equals the single-process loss over the concatenated batch. Features
are gathered with `mmcl.distributed.all_gather_with_grad`, whose backward sums over ranks,
so rank r holds W * dL/dx_r for its own features; DDP/DeepSpeed average parameter
gradients over ranks, which gives exactly the single-process dL/dtheta. The logit scale
(and bias) is replicated: rank r holds dL_r/dtau, and the average over ranks is dL/dtau.
Computing the global loss on every rank instead (OpenCLIP without local_loss) reaches
the same gradients at W times the compute and memory; see tests/losses for issue #616.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcl.distributed import all_gather_with_grad, get_rank

# fn(queries [c, D], keys [N, D], logit_scale, logit_bias, label_offset) -> (loss sum, #correct)
RowFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", int], "tuple[Tensor, Tensor]"]


def sum_over_row_chunks(
    fn: RowFn,
    queries: Tensor,
    keys: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    label_offset: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """Sum `fn` over row chunks of `queries` ([B, D]) scored against all `keys` ([N, D]).

    With `chunk_size` set, each chunk runs under activation checkpointing, so only one
    chunk's [chunk_size, N] logits are alive at a time in forward and in backward (the
    chunk is recomputed there); the value and gradients equal the dense computation.
    Query row i has its positive at key row label_offset + i.
    """
    n = queries.shape[0]
    if chunk_size is None or chunk_size >= n:
        return fn(queries, keys, logit_scale, logit_bias, label_offset)
    loss_sum, correct = queries.new_zeros(()), torch.zeros((), dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk_size):
        chunk_loss, chunk_correct = checkpoint(
            fn, queries[start : start + chunk_size], keys, logit_scale, logit_bias,
            label_offset + start, use_reentrant=False,
        )
        loss_sum, correct = loss_sum + chunk_loss, correct + chunk_correct
    return loss_sum, correct


def _infonce_rows(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, logit_bias: Tensor | None, label_offset: int
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of queries [c, D] over keys [N, D], and the top-1 hit count."""
    logits = logit_scale * queries @ keys.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss_sum, correct


def _clip_terms(
    image_features: Tensor,
    text_features: Tensor,
    all_image_features: Tensor,
    all_text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    label_offset: int,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, i2t hits, t2i hits) for local rows against all columns."""
    i2t_sum, i2t_correct = sum_over_row_chunks(
        _infonce_rows, image_features, all_text_features, logit_scale, logit_bias, label_offset, chunk_size
    )
    t2i_sum, t2i_correct = sum_over_row_chunks(
        _infonce_rows, text_features, all_image_features, logit_scale, logit_bias, label_offset, chunk_size
    )
    loss = (i2t_sum + t2i_sum) / (2 * image_features.shape[0])
    return loss, i2t_correct, t2i_correct


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must both be [batch, dim] with the same shape, "
            f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    label_offset: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """Symmetric InfoNCE: mean of CE(image -> text) and CE(text -> image).

    image_features, text_features: [B, D], L2-normalised, row i of each is a pair.
    logit_scale: scalar, the already-exponentiated multiplier (e.g. 1/0.07).
    logit_bias: optional scalar added to every logit (no effect on the value: softmax is
    shift-invariant; accepted for parity with OpenCLIP).
    With the defaults this is the single-process loss over the batch. For the local-loss
    form pass the gathered [N, D] features as all_*_features and label_offset = rank * B:
    local row i's positive is then column label_offset + i.
    chunk_size: score local rows in checkpointed chunks of this many rows (memory
    O(chunk_size * N) for the logits), same value and gradients.
    Returns a scalar: the mean over the B local rows.
    """
    _check_pair(image_features, text_features)
    all_image_features = image_features if all_image_features is None else all_image_features
    all_text_features = text_features if all_text_features is None else all_text_features
    loss, _, _ = _clip_terms(
        image_features, text_features, all_image_features, all_text_features,
        logit_scale, logit_bias, label_offset, chunk_size,
    )
    return loss


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the global batch of all ranks (local-loss form).

    forward(image_features [B, D], text_features [B, D], logit_scale scalar,
    logit_bias scalar | None) -> {"loss", "i2t_acc", "t2i_acc"}, all scalars.
    Features are L2-normalised; logit_scale is already exponentiated. In a process group
    both features are all-gathered with gradient and this rank's B rows are scored
    against all W*B columns; "loss" is this rank's L_r (see the module docstring for the
    gradient convention: mean over ranks of L_r is the global loss). The accuracies are
    this rank's in-batch top-1 retrieval accuracies against all W*B candidates, detached;
    their mean over ranks is the global accuracy.
    """

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}.")
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        _check_pair(image_features, text_features)
        batch = image_features.shape[0]
        all_image_features = all_gather_with_grad(image_features)
        all_text_features = all_gather_with_grad(text_features)
        loss, i2t_correct, t2i_correct = _clip_terms(
            image_features, text_features, all_image_features, all_text_features,
            logit_scale, logit_bias, get_rank() * batch, self.chunk_size,
        )
        return {
            "loss": loss,
            "i2t_acc": i2t_correct.float() / batch,
            "t2i_acc": t2i_correct.float() / batch,
        }
