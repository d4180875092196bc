"""Rank side of the labelled (FLYP) ClipLoss cases: each rank takes its slice of one global batch."""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses import ClipLoss

GLOBAL_BATCH, DIM, CHUNK = 12, 8, 5
# Classes of the 12 pairs: duplicates within a rank's rows and across the two ranks' halves.
LABELS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 2, -1, -1, 5])


def labelled_batch(seed: int = 7) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=-1)
    return {"img": img, "txt": txt, "scale": torch.tensor(5.0, dtype=torch.float64), "labels": LABELS.clone()}


def labelled_clip_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """This rank's loss, metrics and gradients, dense and chunked, with the labels of its rows."""
    batch = labelled_batch()
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    out: dict[str, Tensor] = {}
    for name, chunk in (("dense", None), ("chunked", CHUNK)):
        img = batch["img"][rows].clone().requires_grad_()
        txt = batch["txt"][rows].clone().requires_grad_()
        scale = batch["scale"].clone().requires_grad_()
        terms = ClipLoss(chunk_size=chunk)(img, txt, scale, labels=batch["labels"][rows])
        terms["loss"].backward()
        out.update({f"{name}/{k}": v.detach() for k, v in terms.items()})
        out.update({f"{name}/img_grad": img.grad, f"{name}/txt_grad": txt.grad, f"{name}/scale_grad": scale.grad})
    return out
