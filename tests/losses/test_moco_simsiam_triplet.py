"""MoCo (v3 in-batch keys, v2 queue), SimSiam and triplet losses equal straightforward float64
reference implementations, in one process and over 2 gloo ranks against the concatenated batch.

Distributed convention (as for clip, see mmcl/losses/clip.py): the mean over ranks of the
rank losses is the global loss; rank r's gradient w.r.t. its own rows is W * dL/dx_r, which
data-parallel averaging turns into the single-process parameter gradient.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gloo_spawn import run_on_gloo_ranks
from mmcl.losses.moco import MoCoLoss, moco_loss
from mmcl.losses.simsiam import SimSiamLoss, simsiam_loss
from mmcl.losses.triplet import TripletLoss, triplet_loss
from moco_rank_cases import (
    GLOBAL_BATCH, MARGIN, MOCO_CASES, TEMPERATURE, TRIPLET_CASES, make_inputs, moco_kwargs,
    moco_simsiam_triplet_case, triplet_name,
)

TOL = 1e-10


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference_moco(q1, q2, k1, k2, temperature, queue=None, scale_by_temperature=False) -> torch.Tensor:
    """MoCo's symmetric InfoNCE written out: query i's positive is key i of the other view, its
    negatives the other keys of the batch (v3) or the queue (v2); keys and queue are constants."""
    def ctr(q, k):
        n, total = q.shape[0], 0.0
        for i in range(n):
            qi = _unit(q[i])
            positive = qi @ _unit(k[i].detach()) / temperature
            if queue is None:
                candidates = [qi @ _unit(k[j].detach()) / temperature for j in range(n)]
            else:
                candidates = [positive] + [qi @ _unit(row.detach()) / temperature for row in queue]
            total = total - torch.log(torch.exp(positive) / sum(torch.exp(c) for c in candidates))
        return total / n

    loss = (ctr(q1, k2) + ctr(q2, k1)) / 2
    return loss * 2 * temperature if scale_by_temperature else loss


def reference_simsiam(p1, p2, z1, z2) -> torch.Tensor:
    """SimSiam written out: minus the mean over both view orders of the mean cosine to the stop-gradient target."""
    def cosine(p, z):
        return sum(_unit(p[i]) @ _unit(z[i].detach()) for i in range(p.shape[0])) / p.shape[0]
    return -(cosine(p1, z2) + cosine(p2, z1)) / 2


def reference_triplet(anchors, positives, margin, mining, symmetric, stats=None) -> torch.Tensor:
    """Triplet loss written out with d = 1 - cos; `stats` counts how the semi-hard negatives were found."""
    def direction(a, p):
        n, losses = a.shape[0], []
        for i in range(n):
            d_ap = 1 - _unit(a[i]) @ _unit(p[i])
            negatives = [1 - _unit(a[i]) @ _unit(p[j]) for j in range(n) if j != i]
            pool = negatives
            if mining == "semi_hard":
                band = [d for d in negatives if d_ap < d < d_ap + margin]
                pool = band or negatives  # FaceNet's band, else the hardest negative
                if stats is not None:
                    stats["band" if band else "fallback"] += 1
            d_an = min(pool, key=lambda d: d.item())
            losses.append(torch.clamp(d_ap - d_an + margin, min=0))
        return sum(losses) / n

    forward = direction(anchors, positives)
    return (forward + direction(positives, anchors)) / 2 if symmetric else forward


def _leaves() -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_() for k, v in make_inputs().items()}


def _reference(kind: str) -> dict[str, torch.Tensor]:
    x = _leaves()
    if kind in MOCO_CASES:
        queue = x["queue"] if kind == "v2" else None
        loss = reference_moco(x["q1"], x["q2"], x["k1"], x["k2"], TEMPERATURE, queue, moco_kwargs(kind)["scale_by_temperature"])
        grads = ("q1", "q2")
    elif kind == "simsiam":
        loss = reference_simsiam(x["p1"], x["p2"], x["z1"], x["z2"])
        grads = ("p1", "p2")
    else:
        mining, symmetric = next(case for case in TRIPLET_CASES if triplet_name(*case) == kind)
        loss = reference_triplet(x["anchors"], x["positives"], MARGIN, mining, symmetric)
        grads = ("anchors", "positives")
    loss.backward()
    return {"loss": loss.detach(), **{f"{k}_grad": x[k].grad for k in grads}}


KINDS = [*MOCO_CASES, "simsiam", *(triplet_name(*case) for case in TRIPLET_CASES)]


def _run(kind: str, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's output on the leaves x, after backward."""
    if kind in MOCO_CASES:
        queue = x["queue"] if kind == "v2" else None
        out = MoCoLoss(**moco_kwargs(kind))(x["q1"], x["q2"], x["k1"], x["k2"], queue)
    elif kind == "simsiam":
        out = SimSiamLoss()(x["p1"], x["p2"], x["z1"], x["z2"])
    else:
        mining, symmetric = next(case for case in TRIPLET_CASES if triplet_name(*case) == kind)
        out = TripletLoss(MARGIN, mining, symmetric)(x["anchors"], x["positives"])
    out["loss"].backward()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_value_and_gradients_in_one_process(kind):
    ref = _reference(kind)
    x = _leaves()
    out = _run(kind, x)
    assert abs(out["loss"].item() - ref["loss"].item()) < TOL
    for name, grad in ref.items():
        if name.endswith("_grad"):
            assert (x[name[: -len("_grad")]].grad - grad).abs().max() < TOL
            assert grad.abs().max() > 1e-3  # not a vacuous comparison
    constants = {"v3": ("k1", "k2", "queue"), "v3_scaled": ("k1", "k2", "queue"), "v2": ("k1", "k2", "queue"),
                 "simsiam": ("z1", "z2")}.get(kind, ())
    assert all(x[k].grad is None for k in constants)  # keys, queue and stop-gradient targets get no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_functional_forms_match_the_modules(kind):
    inputs, ref = make_inputs(), _reference(kind)
    if kind in MOCO_CASES:
        queue = inputs["queue"] if kind == "v2" else None
        value = moco_loss(inputs["q1"], inputs["q2"], inputs["k1"], inputs["k2"], queue, **moco_kwargs(kind))
    elif kind == "simsiam":
        value = simsiam_loss(inputs["p1"], inputs["p2"], inputs["z1"], inputs["z2"])
    else:
        mining, symmetric = next(case for case in TRIPLET_CASES if triplet_name(*case) == kind)
        value = triplet_loss(inputs["anchors"], inputs["positives"], MARGIN, mining, symmetric)
    assert abs(value.item() - ref["loss"].item()) < TOL


def test_test_data_exercises_both_semi_hard_branches_and_both_loss_regimes():
    inputs = make_inputs()
    stats = {"band": 0, "fallback": 0}
    reference_triplet(inputs["anchors"], inputs["positives"], MARGIN, "semi_hard", True, stats)
    assert stats["band"] > 0 and stats["fallback"] > 0
    active = TripletLoss(MARGIN, "batch_hard", True)(inputs["anchors"], inputs["positives"])["active"].item()
    assert 0 < active < 1  # some hinge terms are zero, some are not


# ----------------------------------------------------------------------------- hand-built cases


def test_moco_known_value_and_accuracy():
    n, t = 4, 0.5
    eye = torch.eye(n, dtype=torch.float64)
    # identical orthogonal keys: the positive has cos 1, the n - 1 other keys cos 0
    out = MoCoLoss(t)(eye, eye, eye, eye)
    assert out["loss"].item() == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1)), abs=1e-12)
    assert out["acc"].item() == 1.0
    assert MoCoLoss(t, scale_by_temperature=True)(eye, eye, eye, eye)["loss"].item() == pytest.approx(2 * t * out["loss"].item())
    # the view-2 key of image 3 points away from its query: only that query is wrong, 7 of 8 right
    k2 = eye.clone()
    k2[3] = -eye[3]
    assert MoCoLoss(t)(eye, eye, eye, k2)["acc"].item() == pytest.approx(7 / 8)
    queue = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64), dim=-1)
    assert MoCoLoss(t)(eye, eye, eye, k2, queue)["acc"].item() == pytest.approx(7 / 8)
    # v2 with the known queue: positive 1 (or -1 for image 3 of q1), queue cosines 1/sqrt(2) for images 0, 1
    s = 1 / math.sqrt(2)
    def ce(pos, neg):
        return -pos / t + math.log(math.exp(pos / t) + math.exp(neg / t))
    first = (ce(1, s) + ce(1, s) + ce(1, 0) + ce(-1, 0)) / 4
    second = (ce(1, s) + ce(1, s) + ce(1, 0) + ce(1, 0)) / 4
    assert MoCoLoss(t)(eye, eye, eye, k2, queue)["loss"].item() == pytest.approx((first + second) / 2, abs=1e-12)
    # an empty queue leaves only the positive: zero loss, every query right
    empty = MoCoLoss(t)(eye, eye, eye, k2, queue[:0])
    assert empty["loss"].item() == 0.0 and empty["acc"].item() == 1.0


def test_simsiam_known_values():
    z = torch.randn(5, 3, dtype=torch.float64)
    perfect = SimSiamLoss()(2 * z, z, z, 3 * z)
    assert perfect["loss"].item() == pytest.approx(-1.0) and perfect["cos"].item() == pytest.approx(1.0)
    assert SimSiamLoss()(-z, -z, z, z)["loss"].item() == pytest.approx(1.0)


def test_triplet_active_fraction_and_semi_hard_choice():
    e = torch.eye(4, dtype=torch.float64)
    # pair 0 is perfect (d = 0, its negative at d = 1: no loss); pair 1 is opposite
    # (d = 2, its negative at d = 1: loss 2 - 1 + 0.2 = 1.2). Same in both directions.
    anchors, positives = e[:2], torch.stack([e[0], -e[1]])
    for mining in ("batch_hard", "semi_hard"):
        for symmetric in (True, False):
            out = TripletLoss(0.2, mining, symmetric)(anchors, positives)
            assert out["loss"].item() == pytest.approx(0.6) and out["active"].item() == 0.5

    # anchor 0 = e0 with its positive at d = 0.1, one negative at d = 0.05 (harder than the
    # positive) and one at d = 0.2 (inside the semi-hard band (0.1, 0.3)); anchors 1 and 2
    # are orthogonal to every positive (d = 1 everywhere, loss = margin, no band).
    def at(d, sign):
        return torch.tensor([1 - d, sign * math.sqrt(1 - (1 - d) ** 2), 0.0, 0.0], dtype=torch.float64)
    positives = torch.stack([at(0.1, 1), at(0.05, -1), at(0.2, 1)])
    anchors = torch.stack([e[0], e[2], e[3]])
    hard = TripletLoss(0.2, "batch_hard", symmetric=False)(anchors, positives)
    semi = TripletLoss(0.2, "semi_hard", symmetric=False)(anchors, positives)
    assert hard["loss"].item() == pytest.approx((0.1 - 0.05 + 0.2 + 0.2 + 0.2) / 3)
    assert semi["loss"].item() == pytest.approx((0.1 - 0.2 + 0.2 + 0.2 + 0.2) / 3)
    assert hard["active"].item() == 1.0 and semi["active"].item() == 1.0


def test_bad_inputs_raise():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one shape"):
        MoCoLoss()(x, x, x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="queue must be"):
        MoCoLoss()(x, x, x, x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="temperature must be positive"):
        MoCoLoss(0.0)
    with pytest.raises(ValueError, match="one shape"):
        SimSiamLoss()(x, x, x, torch.randn(3, 3))
    with pytest.raises(ValueError, match="one shape"):
        simsiam_loss(x[0], x[0], x[0], x[0])
    with pytest.raises(ValueError, match="same shape"):
        TripletLoss()(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletLoss(mining="hardest")
    with pytest.raises(ValueError, match="margin must be non-negative"):
        TripletLoss(margin=-0.1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        TripletLoss()(x[:1], x[:1])


# ----------------------------------------------------------------------------- 2 gloo ranks


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_gloo_ranks(moco_simsiam_triplet_case, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_the_concatenated_batch(two_ranks, kind):
    world_size, local = 2, GLOBAL_BATCH // 2
    ref = _reference(kind)
    mean_loss = torch.stack([r[f"{kind}/loss"] for r in two_ranks]).mean()
    assert abs(mean_loss.item() - ref["loss"].item()) < TOL
    for rank, result in enumerate(two_ranks):
        rows = slice(rank * local, (rank + 1) * local)
        for name, grad in ref.items():
            if name.endswith("_grad"):
                assert (result[f"{kind}/{name}"] / world_size - grad[rows]).abs().max() < TOL
        if f"{kind}/const_grads" in result:
            assert not result[f"{kind}/const_grads"].any()


@pytest.mark.parametrize("kind", KINDS)
def test_two_rank_metrics_average_to_the_one_process_metric(two_ranks, kind):
    """acc / cos / active of each rank averaged over ranks equal the one-process value: the
    ranks see every rank's keys / candidates."""
    metric = {"simsiam": "cos"}.get(kind, "acc" if kind in MOCO_CASES else "active")
    single = _run(kind, _leaves())[metric]
    assert torch.stack([r[f"{kind}/{metric}"] for r in two_ranks]).mean().item() == pytest.approx(single.item(), abs=1e-12)
