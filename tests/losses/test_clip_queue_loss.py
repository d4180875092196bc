"""The cross-modal queue loss (clip_queue, ALBEF's contrastive loss) equals a straightforward float64
reference, in one process and over 2 gloo ranks against the concatenated batch; with keys equal to
the features and empty queues its value is the CLIP loss."""
import pytest
import torch

from clip_queue_rank_cases import DISTILL, GLOBAL_BATCH, QUEUE, SCALE, clip_queue_case, make_inputs
from gloo_spawn import assert_ranks_equal_concatenated, run_on_gloo_ranks
from mmcl.losses import ClipQueueLoss, clip_loss, clip_queue_loss

TOL = 1e-10


def reference(image, text, scale, image_keys, text_keys, image_queue, text_queue, distill=0.0):
    """Image i's softmax over all text keys then the text queue (positive: text key i), and
    text i's over all image keys then the image queue (positive: image key i); with distill,
    the target mixes in the momentum key's own softmax over the same candidates (ALBEF)."""
    def direction(query, query_key, candidates, i):
        logits = torch.stack([scale * (query @ c) for c in candidates])
        momentum = torch.softmax(torch.stack([scale.detach() * (query_key @ c) for c in candidates]), 0)
        target = distill * momentum + (1 - distill) * torch.eye(len(candidates), dtype=logits.dtype)[i]
        return -(target * (logits - torch.logsumexp(logits, 0))).sum()

    n = image.shape[0]
    total = 0.0
    for i in range(n):
        total = total + direction(image[i], image_keys[i], list(text_keys) + list(text_queue), i)
        total = total + direction(text[i], text_keys[i], list(image_keys) + list(image_queue), i)
    return total / (2 * n)


def _reference_with_grads(distill: float = 0.0) -> dict:
    x = make_inputs()
    image, text = x["image"].clone().requires_grad_(), x["text"].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    loss = reference(image, text, scale, x["image_keys"], x["text_keys"], x["image_queue"], x["text_queue"], distill)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad}


@pytest.mark.parametrize("distill", [0.0, DISTILL])
def test_one_process_matches_the_reference_and_keys_get_no_gradient(distill):
    ref = _reference_with_grads(distill)
    out = clip_queue_case(0, 1, distill)
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    for key in ("image_grad", "text_grad", "scale_grad"):
        assert (out[key] - ref[key]).abs().max() < TOL, key
    assert ref["image_grad"].abs().max() > 1e-3 and abs(ref["scale_grad"].item()) > 1e-4
    assert not out["keys_have_grad"].any()
    assert out["negatives"].item() == GLOBAL_BATCH + QUEUE - 1
    x = make_inputs()
    functional = clip_queue_loss(x["image"], x["text"], torch.tensor(SCALE, dtype=torch.float64), x["image_keys"],
                                 x["text_keys"], x["image_queue"], x["text_queue"], distill=distill)
    assert abs(functional.item() - ref["loss"].item()) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("distill", [0.0, DISTILL])
def test_two_ranks_equal_the_concatenated_batch(distill):
    ref = _reference_with_grads(distill)
    ranks = run_on_gloo_ranks(clip_queue_case, 2, distill)
    assert_ranks_equal_concatenated(ranks, ref, GLOBAL_BATCH, TOL)
    accuracy = torch.stack([r["i2t_acc"] for r in ranks]).mean()
    assert accuracy == clip_queue_case(0, 1, distill)["i2t_acc"]


def test_keys_equal_to_the_features_and_empty_queues_give_the_clip_loss():
    x = make_inputs()
    scale = torch.tensor(SCALE, dtype=torch.float64)
    empty = torch.zeros(0, x["image"].shape[1], dtype=torch.float64)
    value = ClipQueueLoss()(x["image"], x["text"], scale, x["image"], x["text"], empty, empty)["loss"]
    assert abs(value.item() - clip_loss(x["image"], x["text"], scale).item()) < TOL


def test_more_negatives_raise_the_loss_and_bad_shapes_are_refused():
    x = make_inputs()
    scale = torch.tensor(SCALE, dtype=torch.float64)
    empty = torch.zeros(0, x["image"].shape[1], dtype=torch.float64)
    args = (x["image"], x["text"], scale, x["image_keys"], x["text_keys"])
    assert clip_queue_loss(*args, x["image_queue"], x["text_queue"]) > clip_queue_loss(*args, empty, empty)
    with pytest.raises(ValueError, match="text queue must be"):
        clip_queue_loss(*args, x["image_queue"], x["text_queue"][:, :2])
    assert clip_queue_loss(*args, x["image_queue"], x["text_queue"], distill=0.4) != clip_queue_loss(
        *args, x["image_queue"], x["text_queue"])
    with pytest.raises(ValueError, match="distillation weight"):
        ClipQueueLoss(distill=1.5)
    with pytest.raises(ValueError, match="one shape"):
        clip_queue_loss(x["image"], x["text"], scale, x["image_keys"][:3], x["text_keys"], empty, empty)
