import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from mmcl.losses import SigLipLoss, siglip_loss


def _features(n: int = 10, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)


def reference_siglip(img, txt, scale, bias):
    """SigLIP paper, pair by pair: -sum log sigmoid(z_ij * (t x_i.y_j + b)) / |B|."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(img[i], txt[j]) + bias
            total = total - torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return total / n


def _loss_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    return loss.detach(), torch.autograd.grad(loss, leaves)


def test_siglip_loss_matches_pairwise_reference_value_and_grads():
    inputs = _features()
    ref, ref_grads = _loss_and_grads(reference_siglip, *inputs)
    got, got_grads = _loss_and_grads(siglip_loss, *inputs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    for mine, expected in zip(got_grads, ref_grads):  # image, text, scale, bias
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-13)


def test_siglip_loss_matches_open_clip():
    inputs = _features()
    ours, our_grads = _loss_and_grads(siglip_loss, *inputs)
    theirs, their_grads = _loss_and_grads(OpenSigLipLoss(), *inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    for mine, expected in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-13)


def test_siglip_loss_at_init_of_paper_is_near_log2_per_negative():
    # Orthogonal features, scale 10, bias -10: every negative logit is -10, positives 0.
    img = torch.eye(4, dtype=torch.float64)
    loss = siglip_loss(img, img, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    expected = (4 * math.log(2) + 12 * math.log1p(math.exp(-10))) / 4
    assert abs(loss.item() - expected) < 1e-12


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 10])
def test_siglip_module_matches_functional_for_any_chunk_size(chunk_size):
    inputs = _features()
    ref, ref_grads = _loss_and_grads(siglip_loss, *inputs)
    got, got_grads = _loss_and_grads(SigLipLoss(chunk_size=chunk_size), *inputs)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    for mine, expected in zip(got_grads, ref_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-13)


def test_siglip_accuracy_on_identical_and_swapped_features():
    img = torch.eye(8)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    same = SigLipLoss()(img, img.clone(), scale, bias)
    assert same["i2t_acc"].item() == 1.0 and same["t2i_acc"].item() == 1.0
    swapped = SigLipLoss(chunk_size=3)(img, img[[1, 0, 2, 3, 4, 5, 6, 7]], scale, bias)
    assert swapped["i2t_acc"].item() == 0.75 and swapped["t2i_acc"].item() == 0.75


def test_siglip_module_requires_bias():
    img, txt, scale, _ = _features()
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, scale)
