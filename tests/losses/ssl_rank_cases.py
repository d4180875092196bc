"""What each gloo rank computes in tests/losses/test_ssl_losses.py (kept free of pytest imports)."""

from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses import BYOLLoss, NTXentLoss

GLOBAL_BATCH, DIM, SEED, TEMPERATURE = 8, 6, 4321, 0.3


def make_views(n: int = GLOBAL_BATCH, d: int = DIM, seed: int = SEED) -> dict[str, Tensor]:
    """A fixed float64 batch: two views' projections z1, z2 and BYOL predictions/targets (unnormalised)."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return {
        "z1": 3.0 * z1,  # any scale: both losses normalise
        "z2": z2,
        "p1": torch.randn(n, d, generator=g, dtype=torch.float64),
        "p2": torch.randn(n, d, generator=g, dtype=torch.float64),
        "t1": torch.randn(n, d, generator=g, dtype=torch.float64),
        "t2": torch.randn(n, d, generator=g, dtype=torch.float64),
    }


def ssl_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s NT-Xent and BYOL losses and gradients on its slice of `make_views()`."""
    views = make_views()
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    x = {k: v[rows].clone().requires_grad_() for k, v in views.items()}
    out: dict[str, Tensor] = {}
    ntxent = NTXentLoss(TEMPERATURE)(x["z1"], x["z2"])
    ntxent["loss"].backward()
    out.update({"ntxent/loss": ntxent["loss"].detach(), "ntxent/view_acc": ntxent["view_acc"],
                "ntxent/z1_grad": x["z1"].grad, "ntxent/z2_grad": x["z2"].grad})
    byol = BYOLLoss()(x["p1"], x["p2"], x["t1"], x["t2"])
    byol["loss"].backward()
    out.update({"byol/loss": byol["loss"].detach(), "byol/p1_grad": x["p1"].grad, "byol/p2_grad": x["p2"].grad,
                "byol/t_grads": torch.tensor([x["t1"].grad is not None, x["t2"].grad is not None])})
    return out
