"""Exponential-moving-average (EMA) target networks, as in BYOL.

    target = frozen_copy(online)                       # same weights, requires_grad False
    momentum = cosine_momentum(k, K, base=0.99)        # after optimizer step k of K
    ema_update_(target_params, online_params, momentum)

`cosine_momentum` is BYOL's schedule, tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2:
tau_base at k = 0, (1 + tau_base) / 2 half way, 1 at k = K (the target stops moving).
The update is done in the target's dtype (float32), whatever the online parameters' dtype.
`MomentumEncoder` bundles the copies, the schedule and the (ZeRO-3-aware) update.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import ContextManager

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


Gather = Callable[[list[nn.Parameter]], ContextManager]


def no_gather(parameters: list[nn.Parameter]) -> ContextManager:
    """The parameters are already whole (no ZeRO-3): nothing to gather."""
    return contextlib.nullcontext()


class MomentumEncoder:
    """Frozen float32 copies ("targets") of online modules that follow them as an EMA.

        encoder = MomentumEncoder({"tower": model.image_tower, "projector": head}, base=0.99)
        with encoder.ready(images):                      # device, train/eval modes, autocast
            keys = encoder.target["projector"](...)
        encoder.update(step, total_steps, gather)         # after optimizer step `step` (1-based)

    BYOL's target, MoCo's key encoder and the cross-modal queue's momentum towers. It is a
    plain object, not an nn.Module: DeepSpeed never sees the copies, so they get no
    gradient, no optimizer state, no bf16/fp16 cast and no ZeRO partitioning. They are the
    same on every rank because every rank applies the same update to the same weights.
    Under ZeRO-3 the update reads the online parameters inside `gather` (DeepSpeed's
    GatheredParameters), at most `chunk_elements` values at a time. Make the encoder before
    `deepspeed.initialize`, while the online weights are whole.
    """

    def __init__(self, online: dict[str, nn.Module], base: float = 0.99, final: float = 1.0,
                 chunk_elements: int = 50_000_000):
        self.online = dict(online)
        self.target = nn.ModuleDict({name: frozen_copy(module) for name, module in self.online.items()})
        self.base, self.final, self.chunk_elements = float(base), float(final), int(chunk_elements)

    def pairs(self) -> Iterator[tuple[Tensor, nn.Parameter]]:
        """(target tensor, online parameter) pairs, matched by name."""
        for key, online in self.online.items():
            target = dict(self.target[key].named_parameters())
            for name, parameter in online.named_parameters():
                yield target[name], parameter

    @contextlib.contextmanager
    def ready(self, inputs: Tensor):
        """No gradient, the targets on `inputs`' device in the online modules' train/eval modes,
        and autocast to `inputs`' dtype when it is bf16/fp16 (the targets stay float32)."""
        self.target.to(inputs.device)  # a no-op after the first call
        for key, online in self.online.items():
            for target_module, online_module in zip(self.target[key].modules(), online.modules()):
                target_module.training = online_module.training
        low_precision = inputs.dtype in (torch.bfloat16, torch.float16)
        with torch.no_grad(), torch.autocast(inputs.device.type, dtype=inputs.dtype, enabled=low_precision):
            yield self.target

    @torch.no_grad()
    def update(self, step: int, total_steps: int, gather: Gather = no_gather) -> float:
        """target <- m * target + (1 - m) * online after optimizer step `step` (1-based); returns m."""
        momentum = cosine_momentum(step - 1, total_steps, self.base, self.final)
        chunk, size = [], 0
        for pair in list(self.pairs()) + [None]:
            numel = 0 if pair is None else getattr(pair[1], "ds_numel", pair[1].numel())  # ZeRO-3: full size
            if chunk and (pair is None or size + numel > self.chunk_elements):
                with gather([online for _, online in chunk]):
                    ema_update_([target for target, _ in chunk], [online for _, online in chunk], momentum)
                chunk, size = [], 0
            if pair is not None:
                chunk.append(pair)
                size += numel
        return momentum

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.target.state_dict())

    def load_state_dict(self, state: dict[str, Tensor], what: str = "momentum encoder") -> None:
        expected = set(self.target.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"the saved {what} does not match this model (missing {missing[:2]}, unexpected {unexpected[:2]}).")
        self.target.load_state_dict(state)
