"""NT-Xent (SimCLR) and BYOL losses equal straightforward float64 reference implementations,
in one process and over 2 gloo ranks against the concatenated batch.

Distributed convention (as for clip, see mmcl/losses/clip.py): the mean over ranks of the
rank losses is the global loss; rank r's gradient w.r.t. its own rows is W * dL/dx_r, which
data-parallel averaging turns into the single-process parameter gradient.
"""
import math

import pytest
import torch

from gloo_spawn import run_on_gloo_ranks
from mmcl.losses import LOSSES, BYOLLoss, NTXentLoss, build_loss, byol_loss, ntxent_loss
from ssl_rank_cases import GLOBAL_BATCH, TEMPERATURE, make_views, ssl_case

TOL = 1e-10


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent written out: 2N views, each view's positive is its pair, the other 2N-2 are negatives."""
    views = [v / v.norm() for v in list(z1) + list(z2)]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(torch.exp(views[i] @ views[k] / temperature) for k in range(2 * n) if k != i)
        total = total - torch.log(torch.exp(views[i] @ views[positive] / temperature) / denominator)
    return total / (2 * n)


def reference_byol(p1, p2, t1, t2) -> torch.Tensor:
    """BYOL's symmetric loss written out: sum over both view orders of mean(2 - 2 cos)."""
    def regression(p, t):
        return sum(2 - 2 * (p[i] @ t[i]) / (p[i].norm() * t[i].norm()) for i in range(p.shape[0])) / p.shape[0]
    return regression(p1, t2.detach()) + regression(p2, t1.detach())


def _reference(kind: str) -> dict[str, torch.Tensor]:
    x = {k: v.clone().requires_grad_() for k, v in make_views().items()}
    if kind == "ntxent":
        loss = reference_ntxent(x["z1"], x["z2"], TEMPERATURE)
        loss.backward()
        return {"loss": loss.detach(), "z1_grad": x["z1"].grad, "z2_grad": x["z2"].grad}
    loss = reference_byol(x["p1"], x["p2"], x["t1"], x["t2"])
    loss.backward()
    return {"loss": loss.detach(), "p1_grad": x["p1"].grad, "p2_grad": x["p2"].grad}


def test_ntxent_matches_reference_value_and_gradients_in_one_process():
    ref = _reference("ntxent")
    x = {k: v.clone().requires_grad_() for k, v in make_views().items()}
    out = NTXentLoss(TEMPERATURE)(x["z1"], x["z2"])
    out["loss"].backward()
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    assert (x["z1"].grad - ref["z1_grad"]).abs().max() < TOL
    assert (x["z2"].grad - ref["z2_grad"]).abs().max() < TOL
    assert ref["z1_grad"].abs().max() > 1e-3  # not a vacuous comparison
    functional = ntxent_loss(make_views()["z1"], make_views()["z2"], TEMPERATURE)
    assert abs(functional.item() - ref["loss"].item()) < TOL


def test_byol_matches_reference_value_and_gradients_in_one_process():
    ref = _reference("byol")
    x = {k: v.clone().requires_grad_() for k, v in make_views().items()}
    out = BYOLLoss()(x["p1"], x["p2"], x["t1"], x["t2"])
    out["loss"].backward()
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    assert (x["p1"].grad - ref["p1_grad"]).abs().max() < TOL
    assert (x["p2"].grad - ref["p2_grad"]).abs().max() < TOL
    assert x["t1"].grad is None and x["t2"].grad is None  # targets are detached
    assert abs(byol_loss(x["p1"], x["p2"], x["t1"], x["t2"]).item() - ref["loss"].item()) < TOL


def test_ntxent_known_values():
    """Orthogonal images with identical views: the positive has cos 1, every negative cos 0."""
    n, t = 4, 0.5
    z = torch.eye(n, dtype=torch.float64)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    out = NTXentLoss(t)(z, z.clone())
    assert abs(out["loss"].item() - expected) < 1e-12
    assert out["view_acc"].item() == 1.0
    # BYOL: perfect predictions give 0, opposite ones the maximum 8
    assert BYOLLoss()(z, z, z, z)["loss"].item() == pytest.approx(0.0, abs=1e-12)
    assert BYOLLoss()(-z, -z, z, z)["loss"].item() == pytest.approx(8.0)


def test_losses_are_registered():
    assert LOSSES["ntxent"] is NTXentLoss and LOSSES["byol"] is BYOLLoss
    assert build_loss("ntxent", temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="temperature must be positive"):
        NTXentLoss(0.0)


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_gloo_ranks(ssl_case, 2)


@pytest.mark.parametrize("kind", ["ntxent", "byol"])
def test_two_ranks_equal_the_concatenated_batch(two_ranks, kind):
    world_size, local = 2, GLOBAL_BATCH // 2
    ref = _reference(kind)
    mean_loss = torch.stack([r[f"{kind}/loss"] for r in two_ranks]).mean()
    assert abs(mean_loss.item() - ref["loss"].item()) < TOL
    keys = ("z1", "z2") if kind == "ntxent" else ("p1", "p2")
    for rank, result in enumerate(two_ranks):
        rows = slice(rank * local, (rank + 1) * local)
        for key in keys:
            assert (result[f"{kind}/{key}_grad"] / world_size - ref[f"{key}_grad"][rows]).abs().max() < TOL


def test_two_rank_ntxent_uses_every_ranks_negatives(two_ranks):
    """The view accuracy averaged over ranks equals the one-process accuracy over all 2N candidates."""
    views = make_views()
    single = NTXentLoss(TEMPERATURE)(views["z1"], views["z2"])["view_acc"]
    assert torch.stack([r["ntxent/view_acc"] for r in two_ranks]).mean().item() == pytest.approx(single.item())
    assert not any(r["byol/t_grads"].any() for r in two_ranks)
