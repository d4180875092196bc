"""What each gloo rank computes in tests/losses/test_clip_queue_loss.py (kept free of pytest imports)."""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses import ClipQueueLoss

GLOBAL_BATCH, DIM, QUEUE, SEED, SCALE = 8, 5, 6, 99, 3.0


def make_inputs() -> dict[str, Tensor]:
    """Normalised float64 image/text features [GLOBAL_BATCH, DIM] and queues [QUEUE, DIM]."""
    g = torch.Generator().manual_seed(SEED)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    image = unit(GLOBAL_BATCH)
    return {"image": image, "text": torch.nn.functional.normalize(image + 0.7 * unit(GLOBAL_BATCH), dim=-1),
            "image_queue": unit(QUEUE), "text_queue": unit(QUEUE)}


def clip_queue_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s loss, accuracies and feature/scale gradients on its slice of `make_inputs()`."""
    inputs = make_inputs()
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    image = inputs["image"][rows].clone().requires_grad_()
    text = inputs["text"][rows].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    out = ClipQueueLoss()(image, text, scale, inputs["image_queue"], inputs["text_queue"])
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "i2t_acc": out["i2t_acc"], "t2i_acc": out["t2i_acc"],
            "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad, "negatives": out["negatives"]}
