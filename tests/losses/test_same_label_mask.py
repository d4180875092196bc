"""FLYP's clip loss: pairs of one class are no negatives of each other, in every form of the loss.

The reference is written out by hand (loops over rows and kept columns, float64); the dense,
chunked and 2-rank forms must all equal it, and with all-distinct labels the plain CLIP loss.
"""
import math

import pytest
import torch

from flyp_rank_cases import CHUNK, GLOBAL_BATCH, labelled_batch, labelled_clip_case
from gloo_spawn import run_on_gloo_ranks
from mmcl.losses import ClipLoss, clip_loss
from mmcl.losses.chunked import chunked_infonce
from mmcl.losses.clip import same_label_mask, same_label_pairs


def reference_masked_clip(img, txt, scale, labels) -> float:
    """Mean over pairs of (CE image->texts + CE text->images) / 2, leaving out, for pair i,
    every j != i with labels[j] == labels[i] >= 0."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        kept = [j for j in range(n) if j == i or labels[j] < 0 or labels[j] != labels[i]]
        for queries, keys in ((img, txt), (txt, img)):
            logits = [float(scale * queries[i] @ keys[j]) for j in kept]
            top = max(logits)
            lse = top + math.log(sum(math.exp(x - top) for x in logits))
            total += lse - float(scale * queries[i] @ keys[i])
    return total / (2 * n)


def _loss_and_grads(fn, batch):
    x = {k: batch[k].clone().requires_grad_() for k in ("img", "txt", "scale")}
    loss = fn(x["img"], x["txt"], x["scale"])
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in x.items()}


def test_same_label_mask_leaves_out_same_class_pairs_but_never_the_positive():
    labels = torch.tensor([3, 1, 3, -1, -1])
    expected = torch.tensor([[0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 0],
                             [1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(same_label_mask(labels, labels), expected)
    # Local rows 2..3 of a gathered batch: positives at columns 2 and 3 (offset 2).
    assert torch.equal(same_label_mask(labels[2:4], labels, 2), expected[2:4])
    assert same_label_pairs(labels).item() == 2.0
    assert same_label_pairs(torch.tensor([0, 0, 0, 1, 1, -1])).item() == 3 * 2 + 2 * 1


@pytest.mark.parametrize("chunk", [None, 1, CHUNK, 64], ids=["dense", "chunk1", "chunk5", "one_chunk"])
def test_masked_clip_loss_equals_the_hand_computed_reference(chunk):
    batch = labelled_batch()
    loss = clip_loss(batch["img"], batch["txt"], batch["scale"], labels=batch["labels"], chunk_size=chunk)
    expected = reference_masked_clip(batch["img"], batch["txt"], batch["scale"], batch["labels"].tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    plain = clip_loss(batch["img"], batch["txt"], batch["scale"], chunk_size=chunk)
    assert loss.item() < plain.item()  # fewer negatives: the same positives against a smaller sum


@pytest.mark.parametrize("chunk", [None, CHUNK], ids=["dense", "chunked"])
def test_all_distinct_labels_give_the_plain_clip_loss_and_gradients(chunk):
    batch = labelled_batch()
    distinct = torch.arange(GLOBAL_BATCH)
    masked, masked_grads = _loss_and_grads(
        lambda i, t, s: clip_loss(i, t, s, labels=distinct, chunk_size=chunk), batch)
    plain, plain_grads = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk), batch)
    assert torch.equal(masked, plain)
    for name in plain_grads:
        assert torch.equal(masked_grads[name], plain_grads[name]), name
    unlabelled = clip_loss(batch["img"], batch["txt"], batch["scale"], labels=torch.full((GLOBAL_BATCH,), -1))
    assert unlabelled.item() == pytest.approx(plain.item(), rel=1e-15)


@pytest.mark.parametrize("chunk", [1, CHUNK])
def test_chunked_masked_loss_has_the_dense_masked_gradients(chunk):
    batch = labelled_batch()
    dense, dense_grads = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, labels=batch["labels"]), batch)
    chunked, chunked_grads = _loss_and_grads(
        lambda i, t, s: clip_loss(i, t, s, labels=batch["labels"], chunk_size=chunk), batch)
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-12)
    for name in dense_grads:
        torch.testing.assert_close(chunked_grads[name], dense_grads[name], rtol=0, atol=1e-12)


def test_chunked_rows_against_gathered_keys_mask_like_the_dense_rows():
    """The local-loss form (rows 4..7 of 12 against all keys, offset 4), one direction."""
    batch = labelled_batch()
    labels, rows = batch["labels"], slice(4, 8)
    queries = batch["img"][rows].clone().requires_grad_()
    keys = batch["txt"].clone().requires_grad_()
    loss_sum, _, hits, _ = chunked_infonce(queries, keys, batch["scale"], label_offset=4, chunk=3,
                                           query_labels=labels[rows], key_labels=labels)
    loss_sum.backward()
    logits = (batch["scale"] * queries @ keys.T).masked_fill(same_label_mask(labels[rows], labels, 4), float("-inf"))
    targets = torch.arange(4) + 4
    q2, k2 = queries.detach().clone().requires_grad_(), keys.detach().clone().requires_grad_()
    dense = torch.nn.functional.cross_entropy(
        (batch["scale"] * q2 @ k2.T).masked_fill(same_label_mask(labels[rows], labels, 4), float("-inf")),
        targets, reduction="sum")
    dense.backward()
    assert loss_sum.item() == pytest.approx(dense.item(), rel=1e-12)
    assert hits.item() == (logits.argmax(1) == targets).sum().item()
    torch.testing.assert_close(queries.grad, q2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(keys.grad, k2.grad, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_two_ranks_gather_the_labels_and_average_to_the_single_process_masked_loss():
    batch = labelled_batch()
    expected = reference_masked_clip(batch["img"], batch["txt"], batch["scale"], batch["labels"].tolist())
    single, single_grads = _loss_and_grads(lambda i, t, s: clip_loss(i, t, s, labels=batch["labels"]), batch)
    results = run_on_gloo_ranks(labelled_clip_case, 2)
    for form in ("dense", "chunked"):
        mean_loss = torch.stack([r[f"{form}/loss"] for r in results]).mean()
        assert mean_loss.item() == pytest.approx(expected, rel=1e-12), form
        # Rank r holds W * dL/dx_r for its rows (mmcl.losses.clip's convention); the scale's mean is dL/dtau.
        img_grad = torch.cat([r[f"{form}/img_grad"] for r in results]) / 2
        torch.testing.assert_close(img_grad, single_grads["img"], rtol=0, atol=1e-12)
        scale_grad = torch.stack([r[f"{form}/scale_grad"] for r in results]).mean()
        torch.testing.assert_close(scale_grad, single_grads["scale"], rtol=0, atol=1e-12)
        # Every rank counts the same-label pairs of the whole gathered batch: 0,0,0 / 1,1 / 2,2 -> 6 + 2 + 2.
        assert [r[f"{form}/same_label_pairs"].item() for r in results] == [10.0, 10.0]
    assert single.item() == pytest.approx(expected, rel=1e-12)


def test_clip_loss_module_refuses_labels_of_another_batch_size():
    batch = labelled_batch()
    with pytest.raises(ValueError, match=r"labels must be \[batch\]"):
        ClipLoss()(batch["img"], batch["txt"], batch["scale"], labels=batch["labels"][:3])
