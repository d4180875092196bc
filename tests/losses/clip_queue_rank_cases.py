"""What each gloo rank computes in tests/losses/test_clip_queue_loss.py (kept free of pytest imports)."""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses import ClipQueueLoss

GLOBAL_BATCH, DIM, QUEUE, SEED, SCALE, DISTILL = 8, 5, 6, 99, 3.0, 0.4


def make_inputs() -> dict[str, Tensor]:
    """Normalised float64 features and momentum keys [GLOBAL_BATCH, DIM], and queues [QUEUE, DIM]."""
    g = torch.Generator().manual_seed(SEED)

    def unit(n: int, near: Tensor | None = None) -> Tensor:
        x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x if near is None else near + 0.5 * x, dim=-1)

    image = unit(GLOBAL_BATCH)
    text = unit(GLOBAL_BATCH, image)
    return {"image": image, "text": text, "image_keys": unit(GLOBAL_BATCH, image), "text_keys": unit(GLOBAL_BATCH, text),
            "image_queue": unit(QUEUE), "text_queue": unit(QUEUE)}


def clip_queue_case(rank: int, world_size: int, distill: float = 0.0) -> dict[str, Tensor]:
    """Rank `rank`'s loss, accuracies and gradients on its slice of `make_inputs()`."""
    x = make_inputs()
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    image = x["image"][rows].clone().requires_grad_()
    text = x["text"][rows].clone().requires_grad_()
    keys = {k: x[k][rows].clone().requires_grad_() for k in ("image_keys", "text_keys")}
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    out = ClipQueueLoss(distill)(image, text, scale, keys["image_keys"], keys["text_keys"], x["image_queue"], x["text_queue"])
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "i2t_acc": out["i2t_acc"], "t2i_acc": out["t2i_acc"],
            "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad, "negatives": out["negatives"],
            "keys_have_grad": torch.tensor([k.grad is not None for k in keys.values()])}
