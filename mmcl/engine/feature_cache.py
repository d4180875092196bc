"""Feature-cache gradient accumulation: the exact large-batch image-text gradient from k
micro-batches (GradCache's method, made ZeRO-safe).

1. Encode every micro-batch without gradient (`task.features`, inside the engine) and
   remember each one's RNG state.
2. Evaluate the objectives once over all k x micro x world features (`task.combine`, outside
   the engine: the cacheable objectives have no parameters) and take d loss / d features.
3. Re-encode each micro-batch with gradient under its saved RNG state (the same dropout and
   patch-dropout draws) and back-propagate sum(features . cached gradient) (`task.surrogate`)
   through `engine.backward(scale_wrt_gas=False)`: the cached gradients are already those of
   the full loss. The logit scale/bias get their gradient once, on the first micro-batch.

A non-finite loss is known before any backward, so the whole step is skipped. The boundary
`engine.step()` is the caller's (`mmcl.engine.steps.optimizer_step`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.engine.rng import capture_rng, restore_rng
from mmcl.engine.steps import Accumulated, all_finite, optimizer_step
from mmcl.engine.task import FEATURE_KEYS, at_least_float32


def feature_cache_backward(engine, task, micro_batches: list[dict[str, Tensor]]) -> Accumulated:
    """Steps 1-3 of the module docstring over `micro_batches`; see `mmcl.engine.steps.Accumulated`."""
    rng_states, cached = [], []
    for batch in micro_batches:
        rng_states.append(capture_rng())
        cached.append(engine(batch, task.features))
    after_encode = capture_rng()
    features = {key: at_least_float32(torch.cat([c[key] for c in cached])).requires_grad_() for key in FEATURE_KEYS}
    scales = {key: cached[0][key] for key in ("logit_scale", "logit_bias") if key in cached[0]}
    # Outputs objectives add without gradient (a distillation teacher's features [B, D_t] and
    # scale): rows over all micro-batches, scalars once.
    extras = {key: torch.cat([c[key] for c in cached]) if value.ndim else value for key, value in cached[0].items()
              if key not in features and key not in scales}
    result = task.combine({**features, **scales, **extras})
    if not all_finite(result["loss"].detach()):
        restore_rng(after_encode)
        return Accumulated(None, 1, backward=False)
    gradients = torch.autograd.grad(result["loss"], [features[key] for key in FEATURE_KEYS])
    detached = {**{key: value.detach() for key, value in features.items()}, **extras}
    start = 0
    for index, batch in enumerate(micro_batches):
        size = cached[index]["image_features"].shape[0]
        share = {key: grad[start:start + size] for key, grad in zip(FEATURE_KEYS, gradients)}
        start += size
        restore_rng(rng_states[index])
        out = engine(batch, task.surrogate, share, detached if index == 0 else None)
        # A tensor of its own: without a ZeRO optimizer (stage 0) DeepSpeed would otherwise back-propagate the
        # forward's output itself, whose output hook then divides by the accumulation steps despite
        # scale_wrt_gas=False (DeepSpeed 0.19; under ZeRO the loss scaler already makes a new tensor).
        engine.backward(out["loss"].clone(), scale_wrt_gas=False)
        if index < len(micro_batches) - 1:
            engine.step()  # counts the micro-batch; the update waits for the last one
    restore_rng(after_encode)
    return Accumulated({key: value.detach() for key, value in result.items()}, 0, backward=True)


def feature_cache_step(engine, micro_batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor] | None, int]:
    """One whole optimizer step with feature-cache accumulation: (metrics or None, non-finite losses)."""
    accumulated = feature_cache_backward(engine, engine.module, micro_batches)
    optimizer_step(engine, accumulated)
    return accumulated.metrics, accumulated.nonfinite
