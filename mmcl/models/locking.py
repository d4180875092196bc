"""Freezing towers (LiT-style locking) and keeping frozen parts in eval mode.

`lock_tower(tower, n)` freezes every parameter, then, for n > 0, unfreezes the last n
entries of the tower's main layer stack and every parameter registered after the first of
them. The layer stack is found generically: the `nn.ModuleList` holding the most parameters
(ViT `layers`/`encoder.layer`, BERT `encoder.layer`, CLIP `encoder.layers`, ConvNeXt
`encoder.stages`, T5 `encoder.block`). "Registered after" follows `named_parameters()`
order, which is module definition order: for all the towers above that takes in the final
norms and poolers (ViT `layernorm` + `pooler`, CLIP `post_layernorm` / `final_layer_norm`,
ConvNeXt `layernorm`, T5 `final_layer_norm`) and leaves the embeddings and anything before
the stack (CLIP's `pre_layrnorm`) frozen. A model that registers its final norm before its
layers would keep that norm frozen.

Frozen modules must not behave as in training (dropout on, batch norm statistics moving):
`eval_frozen_modules` puts every submodule whose parameters are all frozen into eval mode;
`DualEncoder.train()` calls it after `nn.Module.train()`. Parameter-free modules (a lone
Dropout) follow their parent: they are switched only when a frozen ancestor is.
"""
from __future__ import annotations

from torch import nn


def find_layer_stack(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, ModuleList) with the most parameters in `module`."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            size = sum(p.numel() for p in child.parameters())
            if best is None or size > best[0]:
                best = (size, name, child)
    if best is None or best[0] == 0:
        raise ValueError(f"{type(module).__name__} has no layer stack (nn.ModuleList) to unlock layers from.")
    return best[1], best[2]


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, key: str = "model.image") -> None:
    """Freeze `tower` except its last `unlocked_layers` layers and what follows them.

    Raises ValueError (one sentence naming `key`) when unlocked_layers exceeds the stack depth.
    """
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    if unlocked_layers <= 0:
        return
    name, stack = find_layer_stack(tower)
    if unlocked_layers > len(stack):
        raise ValueError(
            f"'{key}.unlocked_layers' = {unlocked_layers} but the tower's layer stack '{name}' has only "
            f"{len(stack)} layers; use at most {len(stack)}."
        )
    first = {id(p) for p in stack[len(stack) - unlocked_layers].parameters()}
    unlocked = False
    for parameter in tower.parameters():  # registration order; shared parameters appear once
        unlocked = unlocked or id(parameter) in first
        if unlocked:
            parameter.requires_grad_(True)


def eval_frozen_modules(module: nn.Module) -> None:
    """Put every submodule that has parameters, all frozen, into eval mode (recursively)."""
    for child in module.modules():
        parameters = list(child.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            child.eval()
