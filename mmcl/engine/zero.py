"""ZeRO-3's partitioned parameters made whole, for code that runs outside the engine's forward:
evaluation and export (`full_parameters`) and the EMA updates of momentum copies (`gatherer`).
Under ZeRO 1/2 every parameter is whole on every rank, and both do nothing."""
from __future__ import annotations

import contextlib

from mmcl.models import Gather, no_gather


@contextlib.contextmanager
def full_parameters(engine, hooks: bool = True):
    """Whole (read-only) parameters on every rank (memory: one full copy of the model).

    With `hooks=False` it also lifts ZeRO-3's per-module forward hooks (DeepSpeed's
    `unwrap_model_for_generation`), so each rank may call the model any number of times: the
    hooks would re-partition the parameters after each call and all-gather them again on the
    next, a collective that hangs when ranks encode different numbers of batches (evaluation
    shards rarely split evenly).
    """
    if engine.zero_optimization_stage() != 3:
        yield
    elif hooks:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield


def gatherer(engine) -> Gather:
    """params -> context in which ZeRO-3-partitioned parameters are whole (read-only); a no-op below stage 3."""
    if engine.zero_optimization_stage() != 3:
        return no_gather
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
