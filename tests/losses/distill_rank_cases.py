"""What each gloo rank computes in tests/losses/test_distill_loss.py (kept free of pytest imports)."""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.losses import DistillLoss

GLOBAL_BATCH, DIM, TEACHER_DIM, SEED, SCALE, TEACHER_SCALE = 8, 5, 7, 17, 3.0, 9.0


def make_inputs() -> dict[str, Tensor]:
    """Normalised float64 student [GLOBAL_BATCH, DIM] and teacher [GLOBAL_BATCH, TEACHER_DIM] features."""
    g = torch.Generator().manual_seed(SEED)

    def unit(n: int, dim: int, near: Tensor | None = None) -> Tensor:
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x if near is None else near + 0.7 * x, dim=-1)

    image, teacher_image = unit(GLOBAL_BATCH, DIM), unit(GLOBAL_BATCH, TEACHER_DIM)
    return {"image": image, "text": unit(GLOBAL_BATCH, DIM, image),
            "teacher_image": teacher_image, "teacher_text": unit(GLOBAL_BATCH, TEACHER_DIM, teacher_image)}


def distill_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s loss and gradients on its slice of `make_inputs()`."""
    x = make_inputs()
    local = GLOBAL_BATCH // world_size
    rows = slice(rank * local, (rank + 1) * local)
    image = x["image"][rows].clone().requires_grad_()
    text = x["text"][rows].clone().requires_grad_()
    teacher_image = x["teacher_image"][rows].clone().requires_grad_()
    teacher_text = x["teacher_text"][rows].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    out = DistillLoss()(image, text, scale, teacher_image, teacher_text, torch.tensor(TEACHER_SCALE, dtype=torch.float64))
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "image_grad": image.grad, "text_grad": text.grad, "scale_grad": scale.grad,
            "i2t_agree": out["i2t_agree"], "t2i_agree": out["t2i_agree"],
            "teacher_has_grad": torch.tensor([teacher_image.grad is not None, teacher_text.grad is not None])}
