"""LoRA adapters on a tower through Hugging Face `peft`, merged back for export.

`add_lora(tower, cfg, key)` injects peft's LoRA layers into the tower in place
(`peft.inject_adapter_in_model`): the tower stays the same `transformers` class with the same
forward, its own weights are frozen, and only the adapters (`...lora_A.default.weight`,
`...lora_B.default.weight`) train. Parameter names change only by the adapters' wrapping
(`query.weight` -> `query.base_layer.weight`), so checkpoints, ZeRO partitioning, resume and
elastic resume treat the adapters like any other parameters.

Default targets are found from the module structure, not per model: inside the tower's layer
stack (`find_layer_stack`), the first pair of attention projection names present among
(q_proj, v_proj), (query, value), (q, v), (q_lin, v_lin), or a fused qkv projection; a stack
without attention (ConvNeXt) gets every Linear in it.

`merge_lora(tower)` folds every adapter into its base weight (W + B·A·alpha/r) and puts the
plain module back, leaving an ordinary `transformers` model; `lora_state(tower)` gives the
adapter weights under the names `peft.PeftModel` loads.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from mmcl.models.locking import find_layer_stack
from mmcl.models.settings import LoraConfig

ADAPTER = "default"  # peft's adapter name
ATTENTION_PAIRS = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("q_lin", "v_lin"), ("qkv",),
                   ("query_key_value",), ("c_attn",), ("Wqkv",), ("in_proj",))


def default_target_modules(tower: nn.Module) -> list[str]:
    """The leaf names of the attention query/value projections in `tower`'s layer stack, or of every Linear there."""
    _, stack = find_layer_stack(tower)
    linear = {name.rsplit(".", 1)[-1] for name, module in stack.named_modules() if _is_linear(module)}
    for names in ATTENTION_PAIRS:
        if all(name in linear for name in names):
            return list(names)
    return sorted(linear)


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def peft_config(tower: nn.Module, cfg: LoraConfig):
    """The `peft.LoraConfig` that `cfg` describes for `tower`."""
    import peft

    targets = list(cfg.target_modules) if cfg.target_modules else default_target_modules(tower)
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           bias="none")


def add_lora(tower: nn.Module, cfg: LoraConfig, key: str = "model.image") -> nn.Module:
    """Inject LoRA adapters into `tower` in place and freeze everything else in it; returns the tower.

    Raises ValueError (one sentence naming `key`) when no module matches the targets.
    """
    import peft

    try:
        config = peft_config(tower, cfg)
    except ValueError as error:  # no layer stack
        raise ValueError(f"'{key}.lora' needs 'target_modules' for {type(tower).__name__} ({error})") from error
    if not config.target_modules:
        raise ValueError(f"'{key}.lora' found no Linear layer in {type(tower).__name__}'s layer stack; set "
                         f"'{key}.lora.target_modules' to the module names to adapt.")
    try:
        peft.inject_adapter_in_model(config, tower, adapter_name=ADAPTER)
    except ValueError as error:
        raise ValueError(f"'{key}.lora.target_modules' = {sorted(config.target_modules)} matches no Linear layer of "
                         f"{type(tower).__name__}; name modules it has (e.g. {default_target_modules(tower)}).") from error
    for name, parameter in tower.named_parameters():
        parameter.requires_grad_("lora_" in name)
    tower.mmcl_lora_config = config  # what export writes as adapter_config.json
    return tower


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(child, LoraLayer) for child in module.modules())


def merge_lora(tower: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove them, in place; returns the plain tower."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(tower.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent = tower.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tower
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    for parameter in tower.parameters():
        parameter.requires_grad_(True)
    if hasattr(tower, "mmcl_lora_config"):
        del tower.mmcl_lora_config
    return tower


def lora_state(tower: nn.Module) -> dict[str, Any]:
    """Adapter weights under the names `peft.PeftModel.from_pretrained(base_tower, folder)` loads."""
    from peft import get_peft_model_state_dict

    tower.peft_config = {ADAPTER: tower.mmcl_lora_config}
    try:
        state = get_peft_model_state_dict(tower, adapter_name=ADAPTER)
    finally:
        del tower.peft_config
    return {f"base_model.model.{name}": tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def save_lora_adapter(tower: nn.Module, folder, base_model: str | None = None) -> None:
    """Write `tower`'s adapters as a peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    import copy
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(tower.mmcl_lora_config)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    save_file(lora_state(tower), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
