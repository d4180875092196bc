"""CLIP's InfoNCE against momentum-encoder keys and queues of past keys (ALBEF's contrastive loss).

The queries are the online image and text features (with gradient); every candidate is a
key from momentum (EMA) copies of the towers, constant: the global batch's keys and a queue
of K keys of earlier batches. Rank r scores its B local images and texts:

    logits_i2t = s * image @ [all_text_keys; text_queue].T      [B, W*B + K]
    logits_t2i = s * text  @ [all_image_keys; image_queue].T    [B, W*B + K]
    L_r = (CE(logits_i2t, r*B + i) + CE(logits_t2i, r*B + i)) / 2, mean over the B rows

so image i's positive is the momentum key of its own caption. With `distill` alpha > 0
the one-hot target becomes ALBEF's momentum distillation target,

    target_i2t = alpha * softmax(s * image_key @ [all_text_keys; text_queue].T) + (1 - alpha) * onehot

(and alike for t2i), which gives candidates the momentum model finds as good as the
positive (captions of the same concept, frequent in a queue) part of the target instead of
pushing them all away. All candidates come from the
same (momentum) encoder, as in MoCo: were the in-batch candidates online features and only
the queue momentum ones, the model could tell them apart by encoder instead of content
(measured: it then stalls at ln(global batch)).

Across ranks: the keys carry no gradient, so they are all-gathered without it, and each
rank's loss depends only on its own queries. The mean over ranks of L_r is the
single-process loss over the concatenated batch, and data-parallel gradient averaging
gives its exact parameter gradients (the convention of `clip.py`). With keys equal to the
features and empty queues, the value is exactly `clip_loss`'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.distributed import all_gather_no_grad, get_rank


def _direction(queries: Tensor, query_keys: Tensor, keys: Tensor, queue: Tensor, logit_scale: Tensor,
               label_offset: int, distill: float) -> tuple[Tensor, Tensor]:
    """(mean CE of queries [B, D] over the constant [keys; queue] [N + K, D], top-1 hits).

    query_keys [B, D]: the momentum features of the queries, for the distillation target.
    """
    candidates = torch.cat([keys, queue.to(dtype=keys.dtype, device=keys.device)]).detach()
    logits = logit_scale * queries @ candidates.T
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    hits = (logits.detach().argmax(dim=1) == labels).sum()
    if distill == 0:
        return F.cross_entropy(logits, labels), hits
    with torch.no_grad():
        soft = F.softmax(logit_scale * query_keys.detach() @ candidates.T, dim=1)
        target = distill * soft + (1 - distill) * F.one_hot(labels, candidates.shape[0]).to(soft.dtype)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean(), hits


def _check(image: Tensor, text: Tensor, image_keys: Tensor, text_keys: Tensor, image_queue: Tensor, text_queue: Tensor) -> None:
    shapes = [tuple(t.shape) for t in (image, text, image_keys, text_keys)]
    if image.ndim != 2 or any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"image/text features and their momentum keys must all be [batch, dim] with one shape, got {shapes}.")
    for name, queue in (("image", image_queue), ("text", text_queue)):
        if queue.ndim != 2 or queue.shape[1] != image.shape[1]:
            raise ValueError(f"the {name} queue must be [size, {image.shape[1]}], got {tuple(queue.shape)}.")


def clip_queue_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    image_keys: Tensor,
    text_keys: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    *,
    all_image_keys: Tensor | None = None,
    all_text_keys: Tensor | None = None,
    label_offset: int = 0,
    distill: float = 0.0,
) -> Tensor:
    """ALBEF's contrastive loss (see the module docstring).

    image_features, text_features: [B, D] normalised online features, row i a pair;
    logit_scale: scalar (exponentiated); image_keys, text_keys: [B, D] normalised momentum
    features of the same pairs; image_queue, text_queue: [K, D] normalised earlier keys (K
    may be 0). Keys and queues are constants (detached here). distill: ALBEF's alpha (0 =
    one-hot targets). For the local-loss form pass the gathered [N, D] keys as all_*_keys
    and label_offset = r * B. Returns the mean over the B local rows.
    """
    _check(image_features, text_features, image_keys, text_keys, image_queue, text_queue)
    all_image_keys = image_keys if all_image_keys is None else all_image_keys
    all_text_keys = text_keys if all_text_keys is None else all_text_keys
    _check_distill(distill)
    i2t, _ = _direction(image_features, image_keys, all_text_keys, text_queue, logit_scale, label_offset, distill)
    t2i, _ = _direction(text_features, text_keys, all_image_keys, image_queue, logit_scale, label_offset, distill)
    return (i2t + t2i) / 2


def _check_distill(distill: float) -> None:
    if not 0 <= distill <= 1:
        raise ValueError(f"the distillation weight must be in [0, 1], got {distill}.")


class ClipQueueLoss(nn.Module):
    """forward(image_features, text_features [B, D], logit_scale, image_keys, text_keys [B, D],
    image_queue, text_queue [K, D], logit_bias=None) -> {"loss", "i2t_acc", "t2i_acc", "negatives"}.

    The keys are all-gathered (without gradient) in a process group; the accuracies are top-1
    among all W*B + K candidates; "negatives" is the number of candidates per row minus one.
    A logit bias changes nothing (softmax is shift-invariant) and gets a zero gradient.
    distill: ALBEF's momentum-distillation weight alpha (0 = one-hot targets).
    """

    def __init__(self, distill: float = 0.0):
        super().__init__()
        _check_distill(distill)
        self.distill = float(distill)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, image_keys: Tensor,
                text_keys: Tensor, image_queue: Tensor, text_queue: Tensor,
                logit_bias: Tensor | None = None) -> dict[str, Tensor]:
        _check(image_features, text_features, image_keys, text_keys, image_queue, text_queue)
        all_image, all_text = all_gather_no_grad(image_keys.detach()), all_gather_no_grad(text_keys.detach())
        offset = get_rank() * image_features.shape[0]
        i2t, i2t_hits = _direction(image_features, image_keys, all_text, text_queue, logit_scale, offset, self.distill)
        t2i, t2i_hits = _direction(text_features, text_keys, all_image, image_queue, logit_scale, offset, self.distill)
        loss = (i2t + t2i) / 2
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias
        batch = image_features.shape[0]
        return {"loss": loss, "i2t_acc": i2t_hits.float() / batch, "t2i_acc": t2i_hits.float() / batch,
                "negatives": torch.tensor(float(all_text.shape[0] + text_queue.shape[0] - 1))}
