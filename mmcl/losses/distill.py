"""Distillation from a frozen teacher: OpenCLIP's `DistillClipLoss` over the global batch.

The student's image->text and text->image logits over the global batch are pulled towards
the teacher's softmax over the same pairs (the teacher's features, the teacher's own logit
scale): soft-target cross-entropy, mean over rows, averaged over both directions. Only the
distillation term is computed here; combine it with `clip` by weight (`objectives: {clip:
1.0, distill: 1.0}`), as OpenCLIP adds its `contrastive_loss` and `distill_loss`.

Distributed form (the gradient convention of `mmcl.losses.clip`): rank r scores its B local
rows against all W*B gathered columns, for the student (gathered with gradient) and the
teacher (gathered without; it has none), and returns the mean over its rows. The mean over
ranks of these per-rank losses is the single-process loss over the concatenated batch, and
data-parallel gradient averaging gives its exact gradients (tests/losses/test_distill_loss.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Sum over rows of -sum_j softmax(teacher)_j * log_softmax(student)_j; both [B, N]."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum()


def distill_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    teacher_logit_scale: Tensor | float,
    *,
    all_image_features: Tensor | None = None,
    all_text_features: Tensor | None = None,
    all_teacher_image_features: Tensor | None = None,
    all_teacher_text_features: Tensor | None = None,
) -> Tensor:
    """OpenCLIP's distillation term: mean over rows of the soft cross-entropy, both directions, / 2.

    image_features, text_features: the student's [B, D], L2-normalised; logit_scale its
    (exponentiated) scale. teacher_*: the teacher's [B, Dt] (any width Dt) and its own scale;
    no gradient flows into them. The all_* arguments are the gathered [N, D] / [N, Dt]
    columns for the local-loss form (default: the local features, one process). Local row
    i's targets are the teacher's row i against the same N columns, so no label offset is
    needed. Returns a scalar: the mean over the B local rows.
    """
    all_image_features = image_features if all_image_features is None else all_image_features
    all_text_features = text_features if all_text_features is None else all_text_features
    teacher_image_features = teacher_image_features.detach()
    teacher_text_features = teacher_text_features.detach()
    all_teacher_image = teacher_image_features if all_teacher_image_features is None else all_teacher_image_features.detach()
    all_teacher_text = teacher_text_features if all_teacher_text_features is None else all_teacher_text_features.detach()
    teacher_scale = torch.as_tensor(teacher_logit_scale, dtype=teacher_image_features.dtype).detach()
    i2t = soft_cross_entropy(logit_scale * image_features @ all_text_features.T,
                             teacher_scale * teacher_image_features @ all_teacher_text.T)
    t2i = soft_cross_entropy(logit_scale * text_features @ all_image_features.T,
                             teacher_scale * teacher_text_features @ all_teacher_image.T)
    return (i2t + t2i) / (2 * image_features.shape[0])


class DistillLoss(nn.Module):
    """`distill_loss` over the global batch of all ranks (local-loss form).

    forward(image_features [B, D], text_features [B, D], logit_scale, teacher_image_features
    [B, Dt], teacher_text_features [B, Dt], teacher_logit_scale, logit_bias | None)
    -> {"loss", "i2t_agree", "t2i_agree"}: this rank's loss (the mean over ranks is the
    global loss), and how often the student's top-1 column equals the teacher's (detached).
    A logit bias changes nothing (softmax is shift-invariant) and gets an exact zero gradient.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                teacher_image_features: Tensor, teacher_text_features: Tensor, teacher_logit_scale: Tensor | float,
                logit_bias: Tensor | None = None) -> dict[str, Tensor]:
        if image_features.shape != text_features.shape or teacher_image_features.shape != teacher_text_features.shape \
                or image_features.shape[0] != teacher_image_features.shape[0]:
            raise ValueError(
                f"student features {tuple(image_features.shape)} / {tuple(text_features.shape)} and teacher features "
                f"{tuple(teacher_image_features.shape)} / {tuple(teacher_text_features.shape)} must have the same rows.")
        teacher_image_features = teacher_image_features.to(image_features.dtype)
        teacher_text_features = teacher_text_features.to(image_features.dtype)
        all_image = all_gather_with_grad(image_features)
        all_text = all_gather_with_grad(text_features)
        all_teacher_image = all_gather_no_grad(teacher_image_features)
        all_teacher_text = all_gather_no_grad(teacher_text_features)
        loss = distill_loss(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                            teacher_logit_scale, all_image_features=all_image, all_text_features=all_text,
                            all_teacher_image_features=all_teacher_image, all_teacher_text_features=all_teacher_text)
        if logit_bias is not None:
            loss = loss + 0.0 * logit_bias
        with torch.no_grad():
            i2t = ((image_features @ all_text.T).argmax(1) == (teacher_image_features @ all_teacher_text.T).argmax(1))
            t2i = ((text_features @ all_image.T).argmax(1) == (teacher_text_features @ all_teacher_image.T).argmax(1))
        return {"loss": loss, "i2t_agree": i2t.float().mean(), "t2i_agree": t2i.float().mean()}
