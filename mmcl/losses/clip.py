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

Class labels (FLYP, fine-tuning on class-prompt captions): two pairs of the same class are
not negatives of each other, since their captions may be the very same prompt. With labels
[B] (and the gathered [N]), the logits of same-label pairs other than the positive are
left out of both softmaxes (set to -inf); a label < 0 means "no class" and masks nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mmcl.losses.chunked import chunked_infonce


def same_label_mask(row_labels: Tensor, column_labels: Tensor, label_offset: int = 0) -> Tensor:
    """[B, N] bool: True where row i and column j share a class label (>= 0) and j is not
    row i's positive (column label_offset + i); those logits are left out of the loss."""
    rows = row_labels[:, None]
    mask = (rows == column_labels[None, :]) & (rows >= 0)
    mask.diagonal(label_offset).fill_(False)
    return mask


def same_label_pairs(labels: Tensor) -> Tensor:
    """Ordered pairs (i, j), i != j, of a batch's labels [N] that share a class (>= 0): the
    entries `same_label_mask` leaves out of the [N, N] score matrix. O(N), a float scalar."""
    labelled = labels[labels >= 0]
    if labelled.numel() == 0:
        return labels.new_zeros((), dtype=torch.float32)
    counts = torch.bincount(labelled).float()
    return (counts * (counts - 1)).sum()


def _dense_rows(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, label_offset: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [B, N], summed cross-entropy of queries [B, D] over keys [N, D], top-1 hits);
    `mask` [B, N]: logits left out (same-label pairs)."""
    logits = logit_scale * queries @ keys.T
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    return logits, loss_sum, (logits.detach().argmax(dim=1) == labels).sum()


def _clip_terms(
    image_features: Tensor,
    text_features: Tensor,
    all_image_features: Tensor,
    all_text_features: Tensor,
    logit_scale: Tensor,
    label_offset: int,
    chunk_size: int | None,
    labels: Tensor | None = None,
    all_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, i2t hits, t2i hits) for local rows against all columns; with `labels` [B] and
    `all_labels` [N], same-label pairs are no negatives (see the module docstring).

    When the "all" features are the local ones (one process), both directions come from
    one score matrix, image rows x text columns: its rows give i2t, its columns t2i.
    Across ranks the two directions are different matrices (local images x all texts,
    local texts x all images) and are computed separately.
    """
    symmetric = all_image_features is image_features and all_text_features is text_features and label_offset == 0
    if labels is not None and all_labels is None:
        all_labels = labels
    classes = {} if labels is None else {"query_labels": labels, "key_labels": all_labels}
    if chunk_size is not None and symmetric:
        i2t_sum, t2i_sum, i2t_correct, t2i_correct = chunked_infonce(
            image_features, text_features, logit_scale, chunk=chunk_size, columns=True, **classes
        )
    elif chunk_size is not None:
        i2t_sum, _, i2t_correct, _ = chunked_infonce(
            image_features, all_text_features, logit_scale, label_offset=label_offset, chunk=chunk_size, **classes
        )
        t2i_sum, _, t2i_correct, _ = chunked_infonce(
            text_features, all_image_features, logit_scale, label_offset=label_offset, chunk=chunk_size, **classes
        )
    else:
        # One mask serves both directions: local text row i and gathered image column j are
        # pairs i and j, with the same labels as local image row i and text column j.
        mask = None if labels is None else same_label_mask(labels, all_labels, label_offset)
        if symmetric:  # the mask is symmetric too: mask.T == mask
            logits, i2t_sum, i2t_correct = _dense_rows(image_features, text_features, logit_scale, 0, mask)
            targets = torch.arange(logits.shape[0], device=logits.device)
            t2i_sum = F.cross_entropy(logits.T, targets, reduction="sum")
            t2i_correct = (logits.detach().argmax(dim=0) == targets).sum()
        else:
            _, i2t_sum, i2t_correct = _dense_rows(image_features, all_text_features, logit_scale, label_offset, mask)
            _, t2i_sum, t2i_correct = _dense_rows(text_features, all_image_features, logit_scale, label_offset, mask)
    loss = (i2t_sum + t2i_sum) / (2 * image_features.shape[0])
    return loss, i2t_correct, t2i_correct


def _with_bias(loss: Tensor, logit_bias: Tensor | None) -> Tensor:
    """The loss, with a given bias kept in the graph at its true gradient, exactly 0.

    Softmax is shift-invariant, so the bias changes neither value nor any gradient; it is
    never added to the logits. It stays in the graph so that a learnable bias gets a
    zero gradient instead of none (data-parallel engines flag parameters without one).
    """
    return loss if logit_bias is None else loss + 0.0 * logit_bias


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
    labels: Tensor | None = None,
    all_labels: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE: mean of CE(image -> text) and CE(text -> image).

    image_features, text_features: [B, D], L2-normalised, row i of each is a pair.
    logit_scale: scalar, the already-exponentiated multiplier (e.g. 1/0.07).
    logit_bias: optional scalar added to every logit, which changes nothing (softmax is
    shift-invariant): accepted for parity with OpenCLIP, its gradient is exactly 0.
    With the defaults this is the single-process loss over the batch. For the local-loss
    form pass the gathered [N, D] features as all_*_features and label_offset = rank * B:
    local row i's positive is then column label_offset + i.
    chunk_size: None for the dense loss (holds the [B, N] logits); a chunk side to compute
    the same value and gradients over [chunk_size, chunk_size] chunks of the logits without
    ever holding them (`mmcl.losses.chunked`; memory O(chunk_size^2 + (B + N) * D)).
    `mmcl.losses.chunked.recommended_chunk_size` says when to chunk.
    labels: optional class ids [B] of the pairs (long; < 0 = none), all_labels those of the
    gathered [N] columns (default: labels): pairs of one class are then not negatives of
    each other (their logits are left out), as FLYP fine-tuning on class prompts needs.
    Returns a scalar: the mean over the B local rows.
    """
    _check_pair(image_features, text_features)
    all_image_features = image_features if all_image_features is None else all_image_features
    all_text_features = text_features if all_text_features is None else all_text_features
    loss, _, _ = _clip_terms(
        image_features, text_features, all_image_features, all_text_features, logit_scale, label_offset, chunk_size,
        labels, all_labels,
    )
    return _with_bias(loss, logit_bias)


class ImageTextLoss(nn.Module):
    """Base of the image-text losses: `chunk_size` None (dense) or the side of the exact chunked
    loss's score chunks."""

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}.")
        self.chunk_size = chunk_size


class ClipLoss(ImageTextLoss):
    """CLIP's symmetric InfoNCE over the global batch of all ranks (local-loss form).

    forward(image_features [B, D], text_features [B, D], logit_scale scalar,
    logit_bias scalar | None, labels [B] long | None) -> {"loss", "i2t_acc", "t2i_acc"}
    (+ "same_label_pairs" with labels), all scalars.
    Features are L2-normalised; logit_scale is already exponentiated. In a process group
    both features are all-gathered with gradient and this rank's B rows are scored
    against all W*B columns; "loss" is this rank's L_r (see the module docstring for the
    gradient convention: mean over ranks of L_r is the global loss). The accuracies are
    this rank's in-batch top-1 retrieval accuracies against all W*B candidates, detached;
    their mean over ranks is the global accuracy.
    chunk_size: None for the dense loss, else the side of the score chunks of the exact
    chunked loss (see `clip_loss`); the trainer picks it with
    `mmcl.losses.chunked.recommended_chunk_size(local_batch, global_batch)`.
    labels: class ids [B] of the pairs (FLYP), all-gathered like the features; same-label
    pairs of the global batch are then no negatives, and "same_label_pairs" counts the
    ordered pairs (i != j) of the global batch left out (the same on every rank).
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        _check_pair(image_features, text_features)
        batch = image_features.shape[0]
        if labels is not None and tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be [batch] = [{batch}], got {tuple(labels.shape)}.")
        all_image_features = all_gather_with_grad(image_features)
        all_text_features = all_gather_with_grad(text_features)
        all_labels = None if labels is None else all_gather_no_grad(labels.long())
        loss, i2t_correct, t2i_correct = _clip_terms(
            image_features, text_features, all_image_features, all_text_features,
            logit_scale, get_rank() * batch, self.chunk_size,
            None if labels is None else labels.long(), all_labels,
        )
        terms = {
            "loss": _with_bias(loss, logit_bias),
            "i2t_acc": i2t_correct.float() / batch,
            "t2i_acc": t2i_correct.float() / batch,
        }
        if all_labels is not None:
            terms["same_label_pairs"] = same_label_pairs(all_labels)
        return terms
