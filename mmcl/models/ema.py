"""Exponential-moving-average (EMA) target networks, as in BYOL.

    target = frozen_copy(online)                       # same weights, requires_grad False
    momentum = cosine_momentum(k, K, base=0.99)        # after optimizer step k of K
    ema_update_(target_params, online_params, momentum)

`cosine_momentum` is BYOL's schedule, tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2:
tau_base at k = 0, (1 + tau_base) / 2 half way, 1 at k = K (the target stops moving).
The update is done in the target's dtype (float32), whatever the online parameters' dtype.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """BYOL's momentum at optimizer step `step` (0-based) of `total_steps`: cosine from `base` to `final`."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every parameter frozen (requires_grad False, no grad)."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return target


@torch.no_grad()
def ema_update_(target: Sequence[Tensor], online: Sequence[Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, element-wise, in place.

    The lists pair up one to one with equal shapes; online values are converted to the
    target's dtype and device first.
    """
    if len(target) != len(online):
        raise ValueError(f"EMA update: {len(target)} target tensors but {len(online)} online tensors.")
    if not target:
        return
    sources = [o.detach().to(device=t.device, dtype=t.dtype) for t, o in zip(target, online)]
    for t, s in zip(target, sources):
        if t.shape != s.shape:
            raise ValueError(f"EMA update: target shape {tuple(t.shape)} differs from online shape {tuple(s.shape)}.")
    torch._foreach_mul_(list(target), momentum)
    torch._foreach_add_(list(target), sources, alpha=1.0 - momentum)
