"""One optimizer step under DeepSpeed: plain, or with contrastive feature caching.

Both call `engine.backward` once per micro-batch and `engine.step` once per micro-batch,
which is how DeepSpeed counts micro-steps and decides the accumulation boundary (where
ZeRO reduces, clips and updates). Non-finite losses are detected on every rank together
(an all-reduce), so all ranks skip the same step. An optional `StepTimer` charges the
`engine.step` calls (the optimizer step at the accumulation boundary) to its "optimizer" phase.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

from mmcl.engine.checkpoint import capture_rng, restore_rng
from mmcl.engine.step_timer import StepTimer
from mmcl.engine.task import FEATURE_KEYS


def _optimizer_phase(timer: StepTimer | None):
    return timer.phase("optimizer") if timer is not None else contextlib.nullcontext()


def all_finite(value: Tensor) -> bool:
    """True when `value` is finite on every rank."""
    flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    return flag.item() == 0.0


def plain_step(engine, micro_batches: list[dict[str, Tensor]], timer: StepTimer | None = None) -> tuple[dict[str, Tensor] | None, int]:
    """Forward/backward each micro-batch; negatives come from one micro-batch at a time.

    Returns (metrics averaged over the finite micro-batches or None, number of non-finite
    micro-batches). A non-finite micro-batch contributes no gradient: with one micro-batch
    per step the whole step is skipped (no backward, no optimizer step); with several, it
    back-propagates an exact zero instead, so DeepSpeed's micro-step count stays aligned.
    """
    outputs, nonfinite = [], 0
    for batch in micro_batches:
        out = engine(batch)
        if all_finite(out["loss"].detach()):
            outputs.append(out)
            engine.backward(out["loss"])  # DeepSpeed divides by the accumulation steps
        elif len(micro_batches) == 1:
            return None, 1
        else:
            nonfinite += 1
            engine.backward(engine(batch, mode="zero")["loss"])
        with _optimizer_phase(timer):
            engine.step()
    if not outputs:
        return None, nonfinite
    return {key: torch.stack([o[key].detach().float() for o in outputs]).mean() for key in outputs[0]}, nonfinite


def feature_cache_step(engine, micro_batches: list[dict[str, Tensor]], timer: StepTimer | None = None) -> tuple[dict[str, Tensor] | None, int]:
    """Exact large-batch contrastive gradient from k micro-batches (GradCache, made ZeRO-safe).

    1. Encode every micro-batch without gradient; remember each one's RNG state.
    2. Evaluate the objectives once over all k × micro × world features (outside the
       engine: the objectives have no parameters) and take d loss / d features.
    3. Re-encode each micro-batch with gradient under its saved RNG state (same dropout)
       and back-propagate sum(features · cached gradient) through `engine.backward` with
       `scale_wrt_gas=False`: the cached gradients are already those of the full loss.
       The logit scale/bias get their gradient once, on the first micro-step.
    A non-finite loss is known before any backward, so the whole step is skipped.
    Returns (metrics or None, number of non-finite losses).
    """
    rng_states, cached = [], []
    for batch in micro_batches:
        rng_states.append(capture_rng())
        cached.append(engine(batch, mode="encode"))
    after_encode = capture_rng()
    features = {key: torch.cat([c[key] for c in cached]).float().requires_grad_() for key in FEATURE_KEYS}
    scales = {key: cached[0][key] for key in ("logit_scale", "logit_bias") if key in cached[0]}
    # Outputs objectives add without gradient (a distillation teacher's features [B, D_t] and
    # scale): rows over all micro-batches, scalars once.
    extras = {key: torch.cat([c[key] for c in cached]) if value.ndim else value for key, value in cached[0].items()
              if key not in features and key not in scales}
    result = engine.module.combine({**features, **scales, **extras})
    if not all_finite(result["loss"].detach()):
        restore_rng(after_encode)
        return None, 1
    gradients = torch.autograd.grad(result["loss"], [features[key] for key in FEATURE_KEYS])
    detached = {**{key: value.detach() for key, value in features.items()}, **extras}
    start = 0
    for index, batch in enumerate(micro_batches):
        size = cached[index]["image_features"].shape[0]
        share = {key: grad[start:start + size] for key, grad in zip(FEATURE_KEYS, gradients)}
        start += size
        restore_rng(rng_states[index])
        out = engine(batch, mode="surrogate", feature_grads=share, cached_features=detached if index == 0 else None)
        engine.backward(out["loss"], scale_wrt_gas=False)
        with _optimizer_phase(timer):
            engine.step()
    restore_rng(after_encode)
    return {key: value.detach() for key, value in result.items()}, 0
