"""The optimizer (AdamW over parameter groups) and learning-rate schedules."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mmcl.engine.settings import OptimConfig

# Parameters that conventionally get no weight decay besides every 1-D tensor (biases,
# norm weights, logit scale/bias): learned position tables and class/register tokens.
NO_DECAY_NAME_PARTS = ("position_embedding", "position_embeddings", "pos_embed", "cls_token", "class_embedding", "mask_token")


def build_optimizer(model: nn.Module, cfg: OptimConfig, prefix: str = "") -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, cfg, prefix)`, with torch's fused kernel: one pass over
    each tensor instead of a sequence of foreach ops. Under ZeRO the optimizer steps one flat
    partition, where that is 7.6 ms instead of 58.9 ms for 16 M parameters on the 2-core
    development CPU (the same update up to float rounding)."""
    return torch.optim.AdamW(parameter_groups(model, cfg, prefix), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True)


def parameter_groups(model: nn.Module, cfg: OptimConfig, prefix: str = "") -> list[dict]:
    """Split trainable parameters into (tower × decay) groups with per-tower learning rates.

    Groups carry a `name` ("image_tower/decay", "text_tower/no_decay", "heads/decay", ...)
    so logs can show each group's learning rate. Frozen parameters are left out entirely.
    Tower membership is read from the dual encoder's attribute names (`image_tower.`,
    `text_tower.`); `prefix` is prepended when the model sits inside a task module.
    With layer-wise decay (`optim.layer_decay`), a tower's groups are split further by depth
    ("image_tower/depth_3/decay"), each with the tower's lr times `layer_lr_scales`.
    """
    lrs = {"image_tower": cfg.image_lr if cfg.image_lr is not None else cfg.lr,
           "text_tower": cfg.text_lr if cfg.text_lr is not None else cfg.lr,
           "heads": cfg.lr}
    decays = {"image_tower": cfg.image_layer_decay if cfg.image_layer_decay is not None else cfg.layer_decay,
              "text_tower": cfg.text_layer_decay if cfg.text_layer_decay is not None else cfg.layer_decay}
    scales: dict[int, tuple[int, float]] = {}  # id(parameter) -> (depth, lr scale)
    for part, decay in decays.items():
        tower = getattr(_unprefixed(model, prefix), part, None)
        if decay is not None and tower is not None:
            scales.update(layer_lr_scales(tower, decay))
    groups: dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        local = name[len(prefix):] if prefix and name.startswith(prefix) else name
        part = local.split(".", 1)[0] if local.split(".", 1)[0] in ("image_tower", "text_tower") else "heads"
        decay = parameter.ndim >= 2 and not any(p in local for p in NO_DECAY_NAME_PARTS)
        depth, scale = scales.get(id(parameter), (None, 1.0))
        key = f"{part}/{'' if depth is None else f'depth_{depth}/'}{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {"name": key, "params": [], "lr": lrs[part] * scale,
                                        "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(parameter)
    return list(groups.values())


def _unprefixed(model: nn.Module, prefix: str) -> nn.Module:
    """The submodule that `prefix` ("model.") names, or `model` itself."""
    return model.get_submodule(prefix.rstrip(".")) if prefix else model


def layer_lr_scales(tower: nn.Module, decay: float) -> dict[int, tuple[int, float]]:
    """id(parameter) -> (depth, decay^(N+1-depth)) for every parameter of `tower`.

    The depth comes from the module structure alone: the tower's layer stack (`find_layer_stack`,
    its largest ModuleList, N entries) gives layer i depth i (1..N); what is registered before
    the stack (embeddings, pre-norms) depth 0, what follows it (final norm, pooler) depth N+1,
    which keeps the full learning rate.
    """
    from mmcl.models.locking import find_layer_stack

    _, stack = find_layer_stack(tower)
    layer_of = {id(p): index + 1 for index, layer in enumerate(stack) for p in layer.parameters()}
    top = len(stack) + 1
    scales: dict[int, tuple[int, float]] = {}
    depth = 0
    for parameter in tower.parameters():  # registration (= definition) order
        depth = layer_of.get(id(parameter), top if depth > 0 else 0)
        scales[id(parameter)] = (depth, decay ** (top - depth))
    return scales


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak LR at optimizer step `step` (0-based), warmup included."""
    warmup = max(cfg.warmup_steps, 0)
    floor = cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        cooldown_start = total_steps - cfg.cooldown_steps  # constant_cooldown
        if step < cooldown_start:
            return 1.0
        progress = min(1.0, (step - cooldown_start + 1) / max(1, cfg.cooldown_steps))
        return 1.0 - (1.0 - floor) * progress

    return factor
