"""The chunked losses (chunk_size set) equal the dense ones on one process.

Across 1, 2 and 4 gloo ranks the same comparisons run in test_distributed_losses.py.
"""

import pytest
import torch
import torch.nn.functional as F

from mmcl.losses import ClipLoss, SigLipLoss, clip_loss, siglip_loss
from mmcl.losses.chunked import DEFAULT_CHUNK, DENSE_MAX_LOGITS, recommended_chunk_size, chunked_infonce, chunked_top1_hits

LOSS_MODULES = {"clip": ClipLoss, "siglip": SigLipLoss}


def _batch(n: int = 13, d: int = 7, scale: float = 10.0, noise: float = 1.0, seed: int = 0):
    """float64 normalised image/text features [n, d] (text = noisy image), scale, bias."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)


def _run(fn, inputs, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Loss, grads w.r.t. (img, txt, scale, bias) and accuracies of fn(img, txt, scale, bias)."""
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out if isinstance(out, dict) else {"loss": out}
    grads = torch.autograd.grad(out["loss"], leaves)
    result = {"loss": out["loss"].detach(), **{k: v for k, v in out.items() if k != "loss"}}
    result.update({f"{name}_grad": g for name, g in zip(("img", "txt", "scale", "bias"), grads)})
    return result


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _assert_close(chunked: dict, dense: dict, tol: float, kind: str) -> None:
    for key in ("loss", "img_grad", "txt_grad", "scale_grad") + (("bias_grad",) if kind == "siglip" else ()):
        assert _rel_err(chunked[key], dense[key]) < tol, key
    if kind == "clip":  # softmax is shift-invariant: the bias gradient is exactly zero
        assert chunked["bias_grad"].item() == 0.0 and dense["bias_grad"].item() == 0.0


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 20])  # none divides the batch of 13; 20 is one partial chunk
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_equals_dense_loss_in_value_grads_and_accuracies(kind, chunk, dtype, tol):
    inputs = _batch()
    dense = _run(LOSS_MODULES[kind](), inputs, dtype)
    chunked = _run(LOSS_MODULES[kind](chunk_size=chunk), inputs, dtype)
    _assert_close(chunked, dense, tol, kind)
    assert chunked["i2t_acc"].item() == dense["i2t_acc"].item()
    assert chunked["t2i_acc"].item() == dense["t2i_acc"].item()
    assert 0.0 < dense["i2t_acc"].item() < 1.0  # the accuracy comparison is not vacuous


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_local_loss_form_equals_dense(kind):
    """Local rows 4..8 against all 13 columns: the two-matrix path ranks > 1 take."""
    img, txt, scale, bias = _batch()
    rows = slice(4, 9)

    def loss(chunk_size):
        if kind == "clip":
            return lambda i, t, s, b: clip_loss(
                i[rows], t[rows], s, b, all_image_features=i, all_text_features=t, label_offset=4, chunk_size=chunk_size
            )
        return lambda i, t, s, b: siglip_loss(
            i[rows], t[rows], s, b, all_text_features=t, label_offset=4, chunk_size=chunk_size
        )

    _assert_close(_run(loss(3), (img, txt, scale, bias)), _run(loss(None), (img, txt, scale, bias)), 1e-10, kind)


@pytest.mark.parametrize("seed", range(4))
def test_chunked_clip_float32_is_as_accurate_as_dense_at_logit_scale_100(seed):
    # Logits near 100: a log-sum-exp folded into one float32 number would be off by ~4e-6
    # and the scale's gradient by up to 4e-5 relative; the (max, sum) form stays at dense accuracy.
    inputs = _batch(scale=100.0, noise=0.3, seed=seed)
    exact = _run(ClipLoss(), inputs)
    dense = _run(ClipLoss(), inputs, torch.float32)
    chunked = _run(ClipLoss(chunk_size=5), inputs, torch.float32)
    for key in ("loss", "img_grad", "txt_grad", "scale_grad"):
        assert _rel_err(chunked[key], exact[key]) < max(1e-5, 3 * _rel_err(dense[key], exact[key])), key


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_accuracy_breaks_ties_like_argmax(kind):
    # Text 0 duplicates text 5: image 5 ties between text 0 (chunk 0) and its own text 5
    # (chunk 1), and argmax takes the first: a miss. Image 0 scores 0 against every text:
    # an 8-way tie across both chunks, resolved to text 0: a hit.
    img = torch.eye(8, dtype=torch.float64)
    txt = img.clone()
    txt[0] = img[5]
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    dense = LOSS_MODULES[kind]()(img, txt, scale, bias)
    chunked = LOSS_MODULES[kind](chunk_size=4)(img, txt, scale, bias)
    assert dense["i2t_acc"].item() == 7 / 8 and dense["t2i_acc"].item() == 7 / 8
    assert chunked["i2t_acc"].item() == dense["i2t_acc"].item()
    assert chunked["t2i_acc"].item() == dense["t2i_acc"].item()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_saves_no_score_matrix_for_backward(kind):
    n, d = 64, 4  # a [64, 64] score matrix is 16x larger than the [64, 4] features
    img, txt, scale, bias = (t.requires_grad_() for t in _batch(n=n, d=d))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_loss = LOSS_MODULES[kind]()(img, txt, scale, bias)["loss"]
    assert max(saved) >= n * n  # the hook sees what the dense loss keeps
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = LOSS_MODULES[kind](chunk_size=16)(img, txt, scale, bias)["loss"]
    assert max(saved) <= n * d
    loss.backward()
    assert img.grad is not None and img.grad.abs().max() > 0
    del dense_loss


def test_chunked_top1_hits_match_dense_argmax():
    img, txt, _, _ = _batch(n=30, d=5, noise=1.5)
    for offset, rows in ((0, slice(0, 30)), (10, slice(10, 17))):
        expected = ((img[rows] @ txt.T).argmax(1) == torch.arange(rows.stop - rows.start) + offset).sum()
        assert chunked_top1_hits(img[rows], txt, offset, chunk=4).item() == expected.item()


def test_chunked_loss_in_bfloat16_is_close_to_float32():
    inputs = _batch(n=40, d=16)
    ref = _run(ClipLoss(), inputs, torch.float32)
    got = _run(ClipLoss(chunk_size=16), inputs, torch.bfloat16)
    assert got["img_grad"].dtype == torch.bfloat16
    for key in ("loss", "img_grad", "txt_grad", "scale_grad"):
        assert _rel_err(got[key], ref[key]) < 3e-2, key


def test_recommended_chunk_size_chunks_only_large_batches():
    assert DENSE_MAX_LOGITS == 4096 * 4096
    assert recommended_chunk_size(4096, 4096) is None  # the largest dense batch on one process
    assert recommended_chunk_size(8192, 8192) == DEFAULT_CHUNK
    assert recommended_chunk_size(256, 65536) is None  # 256 ranks of 256: 256 x 65536 logits
    assert recommended_chunk_size(512, 65536) == DEFAULT_CHUNK
    assert recommended_chunk_size(512, 65536, chunk=1024) == 1024
    assert recommended_chunk_size(512, 65536, max_dense_logits=2**25) is None
    with pytest.raises(ValueError, match="local_batch"):
        recommended_chunk_size(64, 32)


def test_chunked_loss_rejects_positives_outside_the_keys():
    img, txt, scale, _ = _batch()
    with pytest.raises(ValueError, match="label_offset 10"):
        chunked_infonce(img[:5], txt, scale, label_offset=10, chunk=4)
    with pytest.raises(ValueError, match="own pairs"):
        chunked_infonce(img[:5], txt, scale, chunk=4, columns=True)


def test_chunked_top1_equals_argmax_under_heavy_ties():
    # Features in {-1, 0, 1}^d make the scores small integers: exact ties everywhere,
    # across chunks, inside chunks and at the positives; argmax takes the first maximum.
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n, d, chunk = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 24), (1, 4), (1, 10)))
        img, txt = (torch.randint(-1, 2, (n, d), generator=g).double() for _ in range(2))
        scores, labels = img @ txt.T, torch.arange(n)
        _, _, row_hits, col_hits = chunked_infonce(img, txt, 1.0, chunk=chunk, columns=True)
        assert row_hits.item() == (scores.argmax(1) == labels).sum().item()
        assert col_hits.item() == (scores.argmax(0) == labels).sum().item()
        b = int(torch.randint(1, n + 1, (1,), generator=g))
        offset = int(torch.randint(0, n - b + 1, (1,), generator=g))
        expected = (scores[offset : offset + b].argmax(1) == labels[:b] + offset).sum().item()
        assert chunked_infonce(img[offset : offset + b], txt, 1.0, label_offset=offset, chunk=chunk)[2].item() == expected
        assert chunked_top1_hits(img[offset : offset + b], txt, offset, chunk).item() == expected
