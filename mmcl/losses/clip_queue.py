"""CLIP's InfoNCE with extra negatives from queues of past momentum-encoder features (ALBEF-style).

Rank r scores its B local images against the W*B texts of the global batch (gathered with
gradient, as in `clip.py`) plus K queued texts, and its B local texts against the W*B
images plus K queued images:

    logits_i2t = s * image @ [all_text; text_queue].T        [B, W*B + K]
    logits_t2i = s * text  @ [all_image; image_queue].T      [B, W*B + K]
    L_r = (CE(logits_i2t, r*B + i) + CE(logits_t2i, r*B + i)) / 2, mean over the B rows

The queues hold normalised features of earlier batches from momentum (EMA) copies of the
towers; they are constants (no gradient) and the same on every rank, so the gradient
convention of `clip.py` holds unchanged: the mean over ranks of L_r is the single-process
loss over the concatenated batch with the same queues, and data-parallel averaging gives
its exact parameter gradients. With empty queues this is exactly `clip_loss`. Unlike ALBEF,
the in-batch candidates are the online features (with gradient), so the queues only add
negatives; the momentum features enter only through the queues.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_with_grad, get_rank


def _direction(queries: Tensor, keys: Tensor, queue: Tensor, logit_scale: Tensor, label_offset: int) -> tuple[Tensor, Tensor]:
    """(mean CE of queries [B, D] over [keys; queue] [N + K, D], top-1 hits)."""
    candidates = torch.cat([keys, queue.detach().to(dtype=keys.dtype, device=keys.device)])
    logits = logit_scale * queries @ candidates.T
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    return F.cross_entropy(logits, labels), (logits.detach().argmax(dim=1) == labels).sum()


def _check(image_features: Tensor, text_features: Tensor, image_queue: Tensor, text_queue: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must both be [batch, dim] with the same shape, "
                         f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}.")
    for name, queue in (("image", image_queue), ("text", text_queue)):
        if queue.ndim != 2 or queue.shape[1] != image_features.shape[1]:
            raise ValueError(f"the {name} queue must be [size, {image_features.shape[1]}], got {tuple(queue.shape)}.")


def clip_queue_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    label_offset: int = 0,
) -> Tensor:
    """Symmetric InfoNCE with queued negatives (see the module docstring).

    image_features, text_features: [B, D] normalised, row i a pair; logit_scale: scalar
    (exponentiated); image_queue, text_queue: [K_i, D], [K_t, D] normalised constants (K may
    be 0). For the local-loss form pass the gathered [N, D] features and label_offset = r*B.
    Returns the mean over the B local rows.
    """
    _check(image_features, text_features, image_queue, text_queue)
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    i2t, _ = _direction(image_features, all_text, text_queue, logit_scale, label_offset)
    t2i, _ = _direction(text_features, all_image, image_queue, logit_scale, label_offset)
    return (i2t + t2i) / 2


class ClipQueueLoss(nn.Module):
    """forward(image_features [B, D], text_features [B, D], logit_scale, image_queue [K, D],
    text_queue [K, D], logit_bias=None) -> {"loss", "i2t_acc", "t2i_acc", "negatives"}.

    Features are all-gathered with gradient in a process group; the accuracies are top-1
    among all W*B + K candidates; "negatives" is the number of candidates per row minus one.
    A logit bias changes nothing (softmax is shift-invariant) and gets a zero gradient.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, image_queue: Tensor,
                text_queue: Tensor, logit_bias: Tensor | None = None) -> dict[str, Tensor]:
        _check(image_features, text_features, image_queue, text_queue)
        all_image, all_text = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
        offset = get_rank() * image_features.shape[0]
        i2t, i2t_hits = _direction(image_features, all_text, text_queue, logit_scale, offset)
        t2i, t2i_hits = _direction(text_features, all_image, image_queue, logit_scale, offset)
        loss = (i2t + t2i) / 2
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias
        batch = image_features.shape[0]
        return {"loss": loss, "i2t_acc": i2t_hits.float() / batch, "t2i_acc": t2i_hits.float() / batch,
                "negatives": torch.tensor(float(all_text.shape[0] + text_queue.shape[0] - 1))}
