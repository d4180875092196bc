"""The distillation loss equals open_clip's DistillClipLoss (value and gradients, float64) in one
process, and over 2 gloo ranks the local-loss form equals one process over the concatenated batch."""
import pytest
import torch
from open_clip.loss import DistillClipLoss

from distill_rank_cases import GLOBAL_BATCH, SCALE, TEACHER_SCALE, distill_case, make_inputs
from gloo_spawn import assert_ranks_equal_concatenated, run_on_gloo_ranks
from mmcl.losses import build_loss, distill_loss

TOL = 1e-12


def open_clip_reference() -> dict:
    """open_clip's distill_loss and its gradients w.r.t. the student's features and logit scale."""
    x = make_inputs()
    image, text = x["image"].clone().requires_grad_(), x["text"].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    _, loss = DistillClipLoss()(image, text, scale, x["teacher_image"], x["teacher_text"],
                                torch.tensor(TEACHER_SCALE, dtype=torch.float64))
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad}


def test_one_process_equals_open_clip_distill_clip_loss_value_and_gradients():
    ref = open_clip_reference()
    out = distill_case(0, 1)
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    for key in ("image_grad", "text_grad", "scale_grad"):
        assert (out[key] - ref[key]).abs().max() < TOL, key
    assert ref["image_grad"].abs().max() > 1e-3 and abs(ref["scale_grad"].item()) > 1e-4  # not trivially zero
    assert not out["teacher_has_grad"].any()
    x = make_inputs()
    functional = distill_loss(x["image"], x["text"], torch.tensor(SCALE, dtype=torch.float64), x["teacher_image"],
                              x["teacher_text"], TEACHER_SCALE)
    assert abs(functional.item() - ref["loss"].item()) < TOL


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_over_the_concatenated_batch():
    ref = open_clip_reference()
    ranks = run_on_gloo_ranks(distill_case, 2)
    assert_ranks_equal_concatenated(ranks, ref, GLOBAL_BATCH, TOL)
    one = distill_case(0, 1)
    assert torch.stack([r["i2t_agree"] for r in ranks]).mean() == one["i2t_agree"]


def test_teacher_identical_to_student_gives_the_student_entropy_and_a_bias_changes_nothing():
    x = make_inputs()
    scale = torch.tensor(SCALE, dtype=torch.float64)
    loss = build_loss("distill")
    same = loss(x["image"], x["text"], scale, x["image"], x["text"], scale)
    logits = SCALE * x["image"] @ x["text"].T
    entropy = lambda l: -(l.softmax(1) * l.log_softmax(1)).sum(1).mean()  # noqa: E731
    assert abs(same["loss"].item() - (entropy(logits) + entropy(logits.T)).item() / 2) < TOL
    assert same["i2t_agree"].item() == 1.0 and same["t2i_agree"].item() == 1.0
    bias = torch.tensor(-10.0, dtype=torch.float64)
    assert loss(x["image"], x["text"], scale, x["teacher_image"], x["teacher_text"], 2.0, bias)["loss"].item() == \
        loss(x["image"], x["text"], scale, x["teacher_image"], x["teacher_text"], 2.0)["loss"].item()
