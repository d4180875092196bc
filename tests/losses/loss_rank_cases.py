"""What each gloo rank computes in tests/losses/test_distributed_losses.py.

Module-level functions the gloo ranks (forked by gloo_spawn.py) call by reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.distributed import all_gather_no_grad, all_gather_with_grad
from mmcl.losses import ClipLoss, SigLipLoss, clip_loss

GLOBAL_BATCH, DIM, SEED = 16, 8, 1234
GATHER_ROWS = 3
# Chunk side of the chunked forms: divides none of the local batches (16, 8, 4) nor the 16 columns.
CHUNK = 3


def make_batch(n: int = GLOBAL_BATCH, d: int = DIM, seed: int = SEED) -> dict[str, Tensor]:
    """The fixed float64 global batch: normalised image/text features [n, d], scale, bias."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return {
        "img": img,
        "txt": txt,
        "scale": torch.tensor(10.0, dtype=torch.float64),
        "bias": torch.tensor(-4.0, dtype=torch.float64),
    }


def one_hot_batch(n: int = GLOBAL_BATCH) -> dict[str, Tensor]:
    """Image i = e_i; texts 0 and n-1 swapped, so exactly those two pairs are misretrieved."""
    img = torch.eye(n, dtype=torch.float64)
    perm = torch.arange(n)
    perm[0], perm[-1] = n - 1, 0
    return {"img": img, "txt": img[perm], "scale": torch.tensor(10.0, dtype=torch.float64),
            "bias": torch.tensor(-4.0, dtype=torch.float64)}


def gather_weights(world_size: int, rank: int) -> Tensor:
    """Rank-dependent weights w_rank [W*GATHER_ROWS, 2] for sum(w * all_gather(x))."""
    return torch.arange(world_size * GATHER_ROWS * 2, dtype=torch.float64).view(-1, 2) + 100.0 * rank


def gather_input(rank: int) -> Tensor:
    return (rank + 1.0) * torch.arange(GATHER_ROWS * 2, dtype=torch.float64).view(GATHER_ROWS, 2)


def _leaves(batch: dict[str, Tensor], rows: slice, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {
        "img": batch["img"][rows].to(dtype, copy=True).requires_grad_(),
        "txt": batch["txt"][rows].to(dtype, copy=True).requires_grad_(),
        "scale": batch["scale"].to(dtype, copy=True).requires_grad_(),
        "bias": batch["bias"].to(dtype, copy=True).requires_grad_(),
    }


def _record(out: dict[str, Tensor], name: str, loss: Tensor, x: dict[str, Tensor], metrics: dict | None = None) -> None:
    loss.backward()
    out[f"{name}/loss"] = loss.detach()
    for key in ("img", "txt", "scale", "bias"):
        grad = x[key].grad
        out[f"{name}/{key}_grad"] = torch.zeros_like(x[key]) if grad is None else grad
    for key, value in (metrics or {}).items():
        out[f"{name}/{key}"] = value


def loss_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s slice of the fixed batch through every loss form; values and grads."""
    batch, out = make_batch(), {}
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)

    modules = {
        "clip": ClipLoss(), "clip_chunked": ClipLoss(chunk_size=CHUNK),
        "siglip": SigLipLoss(), "siglip_chunked": SigLipLoss(chunk_size=CHUNK),
    }
    for dtype, suffix in ((torch.float64, ""), (torch.float32, "_f32")):
        for name, module in modules.items():
            x = _leaves(batch, rows, dtype)
            # The bias goes to the CLIP loss too: it must get its (exactly zero) gradient.
            res = module(x["img"], x["txt"], x["scale"], x["bias"])
            _record(out, name + suffix, res["loss"], x, {"i2t_acc": res["i2t_acc"], "t2i_acc": res["t2i_acc"]})

    # Issue #616: the global loss on every rank over features gathered with gradient ...
    x = _leaves(batch, rows)
    _record(out, "global_gather_grad", clip_loss(all_gather_with_grad(x["img"]), all_gather_with_grad(x["txt"]), x["scale"]), x)
    # ... versus OpenCLIP's default: gathered without gradient, own slice spliced back in.
    x = _leaves(batch, rows)
    spliced = []
    for feats in (x["img"], x["txt"]):
        parts = list(all_gather_no_grad(feats).chunk(world_size))
        parts[rank] = feats
        spliced.append(torch.cat(parts))
    _record(out, "global_spliced", clip_loss(spliced[0], spliced[1], x["scale"]), x)

    hot = one_hot_batch()
    for name, module in modules.items():
        res = module(hot["img"][rows], hot["txt"][rows], hot["scale"], hot["bias"])
        out[f"onehot_{name}/i2t_acc"], out[f"onehot_{name}/t2i_acc"] = res["i2t_acc"], res["t2i_acc"]

    g = gather_input(rank).requires_grad_()
    gathered = all_gather_with_grad(g)
    (gathered * gather_weights(world_size, rank)).sum().backward()
    out["gather/values"], out["gather/grad"] = gathered.detach(), g.grad
    no_grad = all_gather_no_grad(gather_input(rank).requires_grad_())
    out["gather_no_grad/values"] = no_grad
    out["gather_no_grad/requires_grad"] = torch.tensor(no_grad.requires_grad)
    return out
