"""Sigmoid (SigLIP) loss, single-process and across ranks.

SigLIP (Zhai et al., 2023, arXiv:2303.15343): logits = scale * img @ txt.T + bias, label
+1 for the matching pair and -1 for every other pair, loss = -sum(logsigmoid(label *
logit)) / num_images. Across ranks, rank r scores its B local images against the texts of
all ranks (gathered with gradient) and divides by B; the mean over ranks of these
per-rank losses equals the single-process loss over the concatenated batch, with the
gradient convention of `mmcl.losses.clip` (rank r holds W * dL/dx_r for its features and
dL_r/d(scale, bias) for the replicated scalars, whose mean over ranks is dL/d(scale, bias)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from mmcl.losses.clip import ImageTextLoss, _check_pair
from mmcl.losses.chunked import chunked_sigmoid, chunked_top1_hits


def _dense_sigmoid(
    queries: Tensor, keys: Tensor, logit_scale: Tensor, logit_bias: Tensor, label_offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [B, N], summed pairwise sigmoid loss of images [B, D] against texts [N, D], i2t hits)."""
    logits = logit_scale * queries @ keys.T + logit_bias
    rows = torch.arange(queries.shape[0], device=queries.device)
    positives = rows + label_offset
    labels = torch.full_like(logits, -1.0)
    labels[rows, positives] = 1.0
    loss_sum = -F.logsigmoid(labels * logits).sum()
    correct = (logits.detach().argmax(dim=1) == positives).sum()
    return logits, loss_sum, correct


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    all_text_features: Tensor | None = None,
    label_offset: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """Pairwise sigmoid loss of SigLIP, summed over pairs and divided by the local images.

    image_features, text_features: [B, D], L2-normalised, row i of each is a pair.
    logit_scale: scalar, already exponentiated. logit_bias: scalar.
    With the defaults this is the single-process loss. For the distributed form pass the
    gathered texts [N, D] as all_text_features and label_offset = rank * B (image i's
    positive is text label_offset + i); text_features is then unused.
    chunk_size: None for the dense loss, else the side of the [chunk_size, chunk_size]
    score chunks of the exact chunked loss (`mmcl.losses.chunked`), same value and gradients.
    Returns a scalar: -sum_{i, j} logsigmoid(label_ij * logit_ij) / B.
    """
    _check_pair(image_features, text_features)
    keys = text_features if all_text_features is None else all_text_features
    if chunk_size is None:
        _, loss_sum, _ = _dense_sigmoid(image_features, keys, logit_scale, logit_bias, label_offset)
    else:
        loss_sum, _, _ = chunked_sigmoid(
            image_features, keys, logit_scale, logit_bias, label_offset=label_offset, chunk=chunk_size
        )
    return loss_sum / image_features.shape[0]


class SigLipLoss(ImageTextLoss):
    """SigLIP's sigmoid loss over the global batch of all ranks.

    forward(image_features [B, D], text_features [B, D], logit_scale scalar,
    logit_bias scalar) -> {"loss", "i2t_acc", "t2i_acc"}, all scalars.
    In a process group texts are all-gathered with gradient and this rank's B images are
    scored against all W*B texts; "loss" is this rank's share (mean over ranks == global
    loss; gradient convention in the module docstring). Accuracies are top-1 in-batch
    retrieval, detached: i2t of local images among all texts, t2i of local texts among
    all images (images gathered without gradient, for the metric only).
    chunk_size: None for the dense loss, else the side of the score chunks of the exact
    chunked loss (see `siglip_loss`).
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias; give the model a learnable bias (SigLIP initialises it to -10).")
        _check_pair(image_features, text_features)
        batch = image_features.shape[0]
        offset = get_rank() * batch
        all_text_features = all_gather_with_grad(text_features)
        single = all_text_features is text_features
        if self.chunk_size is None:
            logits, loss_sum, i2t_correct = _dense_sigmoid(image_features, all_text_features, logit_scale, logit_bias, offset)
            if single:  # one process: the t2i scores are the columns of the same matrix
                t2i_correct = (logits.detach().argmax(dim=0) == torch.arange(batch, device=logits.device)).sum()
        else:
            loss_sum, i2t_correct, t2i_correct = chunked_sigmoid(
                image_features, all_text_features, logit_scale, logit_bias,
                label_offset=offset, chunk=self.chunk_size, columns=single,
            )
        if not single:  # local texts against all images: a metric only, so no gradient
            all_image_features = all_gather_no_grad(image_features)
            t2i_correct = chunked_top1_hits(text_features, all_image_features, offset, self.chunk_size or batch)
        return {
            "loss": loss_sum / batch,
            "i2t_acc": i2t_correct.float() / batch,
            "t2i_acc": t2i_correct.float() / batch,
        }
