"""A DualEncoder from its ModelConfig, started from `model.init_from` when that is set.

`build_model(cfg)` is `mmcl.models.build_model` for a config without `init_from`. With one, it
reads the source once (`read_source`: a SiglipModel, Siglip2Model or VisionTextDualEncoderModel folder, an
mmcl export or an mmcl model directory; a CLIPModel's towers load by `name_or_path` instead),
builds the towers from the source's own configs and copies its tower weights, heads and logit
scale (and bias) in (`mmcl.models.init_from`). It sits above `mmcl.models` because it reads mmcl
exports (`mmcl.export.hf_loader`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mmcl.models import DualEncoder
from mmcl.models.dual_encoder import add_tower_lora
from mmcl.models.init_from import InitSource, _inline, _prefixed, load_init_from, resolve_init_towers
from mmcl.models.init_source import HEADS_FILE, MODEL_DIR_WEIGHTS, source_kind


def build_model(cfg, image_size: int | None = None) -> DualEncoder:
    """`DualEncoder.from_config(cfg, image_size)`; with `cfg.init_from`, its towers, heads and logit scale
    from there. LoRA adapters (`model.<side>.lora`) go in after the source's weights, around them."""
    if cfg.init_from is None:
        return DualEncoder.from_config(cfg, image_size)
    source = read_source(cfg.init_from)  # None for a CLIPModel: its towers load by name_or_path
    plain = replace(cfg, image=replace(cfg.image, lora=None), text=cfg.text and replace(cfg.text, lora=None))
    model = DualEncoder.from_config(plain if source is None else resolve_init_towers(plain, source), image_size)
    load_init_from(model, cfg, source, image_size)
    for side in ("image", "text"):
        tower_cfg = getattr(cfg, side)
        if tower_cfg is not None and tower_cfg.lora is not None:
            add_tower_lora(getattr(model, f"{side}_tower"), tower_cfg, f"model.{side}")
    return model


def read_source(init_from: str) -> InitSource | None:
    """The source of `model.init_from` (None for a CLIPModel, whose towers load by name_or_path).

    Towers are loaded with transformers' own classes, so its checkpoint key conversions apply."""
    kind, described = source_kind(init_from)
    if kind in (None, "clip"):
        return None
    folder = Path(init_from).expanduser()
    try:
        if kind == "export" and not folder.is_dir():  # a Hub repo: its files, through the cache
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(init_from))
        if kind == "model_dir":
            from safetensors.torch import load_file

            model = described.get("model") or {}
            configs = {side: dict(model[side]["config"]) for side in ("image", "text") if isinstance(model.get(side), dict)}
            return InitSource(init_from, configs, {k: v.float() for k, v in load_file(str(folder / MODEL_DIR_WEIGHTS)).items()})
        if kind == "export":
            from safetensors.torch import load_file

            from mmcl.export.hf_loader import load_exported

            exported = load_exported(folder)
            towers = {"image": exported.image_tower, "text": exported.text_tower}
            config = exported.model.config
            configs = {"image": config} if exported.text_tower is None else {"image": config.vision_config, "text": config.text_config}
            state = {k: v.float() for k, v in load_file(str(folder / HEADS_FILE)).items()}
        else:
            import transformers

            from mmcl.models.towers import _DTYPE_KWARG

            cls = {"siglip": transformers.SiglipModel, "siglip2": transformers.Siglip2Model}.get(
                kind, transformers.VisionTextDualEncoderModel)
            loaded = cls.from_pretrained(init_from, **{_DTYPE_KWARG: torch.float32})
            towers = {"image": loaded.vision_model, "text": loaded.text_model}
            configs = {"image": loaded.config.vision_config, "text": loaded.config.text_config}
            state = {name: loaded.state_dict()[name].float() for name in ("logit_scale", "logit_bias") if name in loaded.state_dict()}
            if kind == "vtde":
                state.update({"image_projection.weight": loaded.visual_projection.weight.detach().float(),
                              "text_projection.weight": loaded.text_projection.weight.detach().float()})
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:150]
        raise ValueError(f"'model.init_from' = '{init_from}' could not be loaded ({reason}); save it again with "
                         "save_pretrained (or `mmcl export`).") from error
    for side, tower in towers.items():
        if tower is not None:
            state.update(_prefixed(f"{side}_tower", tower))
    return InitSource(init_from, {side: _inline(config) for side, config in configs.items()}, state)
