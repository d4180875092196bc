"""What each gloo rank computes in tests/losses/test_moco_simsiam_triplet.py (kept free of pytest imports)."""

from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses.moco import MoCoLoss
from mmcl.losses.simsiam import SimSiamLoss
from mmcl.losses.triplet import TripletLoss

GLOBAL_BATCH, DIM, QUEUE_SIZE, SEED = 8, 6, 5, 2468
TEMPERATURE, MARGIN = 0.3, 0.4
MOCO_CASES = ("v3", "v3_scaled", "v2")
TRIPLET_CASES = tuple((mining, symmetric) for mining in ("batch_hard", "semi_hard") for symmetric in (True, False))


def make_inputs(n: int = GLOBAL_BATCH, d: int = DIM, seed: int = SEED) -> dict[str, Tensor]:
    """A fixed float64 batch (unnormalised): MoCo queries/keys and queue, SimSiam predictions/
    projections, triplet anchors/positives (positives near their anchors, so mining matters)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q1 = randn(n, d)
    anchors = randn(n, d)
    return {
        "q1": 2.0 * q1,  # any scale: every loss normalises
        "q2": q1 + 0.7 * randn(n, d),
        "k1": q1 + 0.5 * randn(n, d),
        "k2": q1 + 0.5 * randn(n, d),
        "queue": torch.nn.functional.normalize(randn(QUEUE_SIZE, d), dim=-1),
        "p1": randn(n, d),
        "p2": randn(n, d),
        "z1": randn(n, d),
        "z2": randn(n, d),
        "anchors": 1.5 * anchors,
        "positives": anchors + 0.9 * randn(n, d),
    }


def moco_kwargs(case: str) -> dict:
    """MoCoLoss constructor arguments for a MoCo case ("v2" also passes the queue)."""
    return {"temperature": TEMPERATURE, "scale_by_temperature": case == "v3_scaled"}


def triplet_name(mining: str, symmetric: bool) -> str:
    return f"triplet_{mining}_{'sym' if symmetric else 'oneway'}"


def moco_simsiam_triplet_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s losses, metrics and gradients on its slice of `make_inputs()`."""
    inputs = make_inputs()
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    out: dict[str, Tensor] = {}

    def local_inputs() -> dict[str, Tensor]:
        return {k: (v if k == "queue" else v[rows]).clone().requires_grad_() for k, v in inputs.items()}

    for case in MOCO_CASES:
        x = local_inputs()
        queue = x["queue"] if case == "v2" else None
        result = MoCoLoss(**moco_kwargs(case))(x["q1"], x["q2"], x["k1"], x["k2"], queue)
        result["loss"].backward()
        out.update({f"{case}/loss": result["loss"].detach(), f"{case}/acc": result["acc"],
                    f"{case}/q1_grad": x["q1"].grad, f"{case}/q2_grad": x["q2"].grad,
                    f"{case}/const_grads": torch.tensor([x[k].grad is not None for k in ("k1", "k2", "queue")])})

    x = local_inputs()
    result = SimSiamLoss()(x["p1"], x["p2"], x["z1"], x["z2"])
    result["loss"].backward()
    out.update({"simsiam/loss": result["loss"].detach(), "simsiam/cos": result["cos"],
                "simsiam/p1_grad": x["p1"].grad, "simsiam/p2_grad": x["p2"].grad,
                "simsiam/const_grads": torch.tensor([x[k].grad is not None for k in ("z1", "z2")])})

    for mining, symmetric in TRIPLET_CASES:
        name = triplet_name(mining, symmetric)
        x = local_inputs()
        result = TripletLoss(MARGIN, mining, symmetric)(x["anchors"], x["positives"])
        result["loss"].backward()
        out.update({f"{name}/loss": result["loss"].detach(), f"{name}/active": result["active"],
                    f"{name}/anchors_grad": x["anchors"].grad, f"{name}/positives_grad": x["positives"].grad})
    return out
