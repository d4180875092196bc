"""The cross-modal queue loss (clip_queue) equals a straightforward float64 reference, in one process
and over 2 gloo ranks against the concatenated batch, and equals the CLIP loss with empty queues."""
import pytest
import torch

from clip_queue_rank_cases import GLOBAL_BATCH, QUEUE, SCALE, clip_queue_case, make_inputs
from gloo_spawn import run_on_gloo_ranks
from mmcl.losses import ClipQueueLoss, clip_loss, clip_queue_loss

TOL = 1e-10


def reference(image, text, scale, image_queue, text_queue):
    """Each image's softmax over all texts then the text queue, and each text's over all images then the image queue."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        texts = list(text) + list(text_queue)
        images = list(image) + list(image_queue)
        i2t = torch.stack([scale * (image[i] @ t) for t in texts])
        t2i = torch.stack([scale * (text[i] @ m) for m in images])
        total = total - (i2t[i] - torch.logsumexp(i2t, 0)) - (t2i[i] - torch.logsumexp(t2i, 0))
    return total / (2 * n)


def _reference_with_grads() -> dict:
    x = make_inputs()
    image, text = x["image"].clone().requires_grad_(), x["text"].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    loss = reference(image, text, scale, x["image_queue"], x["text_queue"])
    loss.backward()
    return {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad}


def test_one_process_matches_the_reference():
    ref = _reference_with_grads()
    out = clip_queue_case(0, 1)
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    for key in ("image_grad", "text_grad", "scale_grad"):
        assert (out[key] - ref[key]).abs().max() < TOL, key
    assert ref["image_grad"].abs().max() > 1e-3 and abs(ref["scale_grad"].item()) > 1e-4
    assert out["negatives"].item() == GLOBAL_BATCH + QUEUE - 1
    x = make_inputs()
    functional = clip_queue_loss(x["image"], x["text"], torch.tensor(SCALE, dtype=torch.float64), x["image_queue"], x["text_queue"])
    assert abs(functional.item() - ref["loss"].item()) < TOL


def test_two_ranks_equal_the_concatenated_batch():
    ref = _reference_with_grads()
    ranks = run_on_gloo_ranks(clip_queue_case, 2)
    assert abs(torch.stack([r["loss"] for r in ranks]).mean().item() - ref["loss"].item()) < TOL
    local = GLOBAL_BATCH // 2
    for rank, result in enumerate(ranks):
        rows = slice(rank * local, (rank + 1) * local)
        for key in ("image_grad", "text_grad"):  # rank r holds W * dL/dx_r (gather's summing backward)
            assert (result[key] / 2 - ref[key][rows]).abs().max() < TOL, (rank, key)
    scale_grad = torch.stack([r["scale_grad"] for r in ranks]).mean()  # data-parallel averaging
    assert abs(scale_grad.item() - ref["scale_grad"].item()) < TOL


def test_empty_queues_give_exactly_the_clip_loss_and_queue_keys_get_no_gradient():
    x = make_inputs()
    scale = torch.tensor(SCALE, dtype=torch.float64)
    empty = torch.zeros(0, x["image"].shape[1], dtype=torch.float64)
    image = x["image"].clone().requires_grad_()
    queue = x["text_queue"].clone().requires_grad_()
    with_queue = ClipQueueLoss()(image, x["text"], scale, empty, empty)["loss"]
    assert abs(with_queue.item() - clip_loss(x["image"], x["text"], scale).item()) < TOL
    ClipQueueLoss()(image, x["text"], scale, x["image_queue"], queue)["loss"].backward()
    assert queue.grad is None and image.grad is not None


def test_more_negatives_raise_the_loss_and_bad_shapes_are_refused():
    x = make_inputs()
    scale = torch.tensor(SCALE, dtype=torch.float64)
    empty = torch.zeros(0, x["image"].shape[1], dtype=torch.float64)
    assert clip_queue_loss(x["image"], x["text"], scale, x["image_queue"], x["text_queue"]) > clip_queue_loss(
        x["image"], x["text"], scale, empty, empty)
    with pytest.raises(ValueError, match="text queue must be"):
        clip_queue_loss(x["image"], x["text"], scale, x["image_queue"], x["text_queue"][:, :2])
    with pytest.raises(ValueError, match="same shape"):
        clip_queue_loss(x["image"], x["text"][:3], scale, x["image_queue"], x["text_queue"])
