import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from mmcl.losses import ClipLoss, clip_loss


def _features(n: int = 12, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    return img, txt, scale


def _loss_and_grads(fn, img, txt, scale, *extra):
    leaves = [t.clone().requires_grad_() for t in (img, txt, scale, *extra)]
    loss = fn(*leaves)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    grads = torch.autograd.grad(loss, leaves[:3])
    return loss.detach(), grads


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_clip_loss_matches_open_clip_value_and_grads():
    img, txt, scale = _features()
    ours, our_grads = _loss_and_grads(clip_loss, img, txt, scale)
    theirs, their_grads = _loss_and_grads(OpenClipLoss(), img, txt, scale)
    assert _rel_err(ours, theirs) < 1e-12
    for mine, ref in zip(our_grads, their_grads):  # image feats, text feats, logit scale
        assert _rel_err(mine, ref) < 1e-12


def test_clip_loss_equals_explicit_symmetric_cross_entropy():
    img, txt, scale = _features(n=5)
    logits = scale * img @ txt.T
    i2t = -torch.stack([logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)]).mean()
    t2i = -torch.stack([logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)]).mean()
    torch.testing.assert_close(clip_loss(img, txt, scale), (i2t + t2i) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 12, 50])
def test_clip_module_matches_functional_for_any_chunk_size(chunk_size):
    img, txt, scale = _features()
    ref, ref_grads = _loss_and_grads(clip_loss, img, txt, scale)
    got, got_grads = _loss_and_grads(ClipLoss(chunk_size=chunk_size), img, txt, scale)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    for mine, expected in zip(got_grads, ref_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-14)


def test_clip_logit_bias_leaves_loss_unchanged():
    img, txt, scale = _features()
    with_bias = ClipLoss()(img, txt, scale, torch.tensor(-3.0, dtype=torch.float64))["loss"]
    torch.testing.assert_close(with_bias, clip_loss(img, txt, scale), rtol=1e-12, atol=0)


def test_clip_accuracy_is_one_on_identical_features():
    img, _, scale = _features(n=8, d=16)
    out = ClipLoss()(img, img.clone(), scale)
    assert out["i2t_acc"].item() == 1.0 and out["t2i_acc"].item() == 1.0
    assert not out["i2t_acc"].requires_grad


def test_clip_accuracy_counts_swapped_pairs():
    img = torch.eye(8)
    txt = img[[1, 0, 2, 3, 4, 5, 6, 7]]  # pairs 0 and 1 point at each other's text
    out = ClipLoss(chunk_size=3)(img, txt, torch.tensor(10.0))
    assert out["i2t_acc"].item() == 0.75 and out["t2i_acc"].item() == 0.75


def test_clip_loss_rejects_mismatched_batches():
    img, txt, scale = _features()
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(img, txt[:-1], scale)


def test_clip_loss_rejects_non_positive_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=0)
