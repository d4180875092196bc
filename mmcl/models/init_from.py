"""Start a DualEncoder from a pretrained two-tower model (`model.init_from`; see `mmcl.models.init_source`).

CLIPModel sources:

`model.init_from: DIR` (a CLIPModel folder such as `mmcl convert openclip` writes, or a Hub id)
makes the config loader fill in both towers from DIR (`name_or_path`), the embedding width,
the context length and the image normalisation; `mmcl.pretrained.build_model` then calls
`load_clip_heads` to copy CLIPModel's `visual_projection` / `text_projection` into mmcl's
linear heads and its `logit_scale` (a log, like mmcl's), so step 0 computes CLIPModel's (and
the converted OpenCLIP model's) embeddings and logits.

Every other source (SiglipModel, VisionTextDualEncoderModel, an mmcl export or model directory) is
read by `mmcl.pretrained.read_source` (it reads exports, which sit above the models) into an
`InitSource`; `resolve_init_towers` turns each tower whose `name_or_path` is the source into the source's own
inline tower config, and `load_init_from` copies the source's tower weights, the heads of those
sides and the logit scale (and bias) into the built model, read from its safetensors by name.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEAD_NAMES = {"image_projection": "visual_projection.weight", "text_projection": "text_projection.weight"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def _weight_file(source: str, filename: str) -> Path:
    """A file of the CLIPModel at `source` (local folder, else a Hub id through the cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, filename))


def read_clip_tensors(source: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of a CLIPModel's safetensors weights (single file or sharded), nothing else."""
    from safetensors import safe_open

    try:
        files = {name: _weight_file(source, SINGLE_FILE) for name in names}
        if not files[names[0]].is_file():
            raise FileNotFoundError(files[names[0]])
    except (OSError, ValueError):
        index = json.loads(_weight_file(source, INDEX_FILE).read_text())["weight_map"]
        files = {name: _weight_file(source, index[name]) for name in names if name in index}
    out = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():
                out[name] = handle.get_tensor(name).float()
    return out


def load_clip_heads(model: nn.Module, source: str) -> None:
    """Copy CLIPModel's projections and logit scale from `source` into the DualEncoder `model` (in place)."""
    wanted = list(HEAD_NAMES.values()) + ["logit_scale"]
    try:
        tensors = read_clip_tensors(source, wanted)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"'model.init_from' = '{source}': its CLIPModel weights could not be read ({str(error)[:150]}).") from error
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"'model.init_from' = '{source}' has no {', '.join(missing)}; it must be a CLIPModel "
                         "(e.g. written by `mmcl convert openclip`).")
    with torch.no_grad():
        for attribute, name in HEAD_NAMES.items():
            head = getattr(model, attribute)
            kind = "image" if attribute.startswith("image") else "text"
            if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.shape != tensors[name].shape:
                raise ValueError(f"'model.{kind}.projection' must be linear with model.embed_dim = "
                                 f"{tensors[name].shape[0]} to start from the CLIPModel in '{source}'.")
            head.weight.copy_(tensors[name])
        model.logit_scale.copy_(tensors["logit_scale"].reshape(model.logit_scale.shape))


# ----------------------------------------------------------------------------- any other source

_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "id2label", "label2id")


@dataclass
class InitSource:
    """A non-CLIPModel `init_from`, read once: per side its tower's inline config (and class), and its
    weights named as the DualEncoder's (`image_tower.*`, `image_projection.*`, ..., `logit_scale`, `logit_bias`)."""

    path: str
    tower_configs: dict[str, dict[str, Any]]
    state: dict[str, torch.Tensor]


def _inline(config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE_KEYS}


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor.detach().float() for name, tensor in module.state_dict().items()}


def _from_source(cfg) -> list[str]:
    """The sides whose tower comes from `cfg.init_from`."""
    sides = [("image", cfg.image)] + ([("text", cfg.text)] if cfg.text is not None else [])
    return [side for side, tower in sides if tower.name_or_path == cfg.init_from]


def resolve_init_towers(cfg, source: InitSource):
    """A copy of the ModelConfig `cfg` whose towers from `source` are its inline configs (weights: load_init_from)."""
    from dataclasses import replace

    changes = {}
    for side in _from_source(cfg):
        tower = getattr(cfg, side)
        tokenizer = {"tokenizer": tower.tokenizer or cfg.init_from} if side == "text" else {}
        changes[side] = replace(tower, name_or_path=None, config=source.tower_configs[side], **tokenizer)
    return replace(cfg, **changes)


def _load_tower(tower: nn.Module, tensors: dict[str, torch.Tensor], side: str, source: str) -> None:
    """Load a tower from the source tower's tensors, which may lack or add one leading module name
    (CLIPModel holds CLIPVisionTransformer, mmcl CLIPVisionModel around it)."""
    wanted = set(tower.state_dict())
    heads = {name.split(".", 1)[0] for name in wanted}
    candidates = [tensors]
    if len(heads) == 1:  # every weight under one child: try adding its name
        candidates.append({f"{next(iter(heads))}.{name}": t for name, t in tensors.items()})
    firsts = {name.split(".", 1)[0] for name in tensors}
    if len(firsts) == 1:  # and removing the source's
        candidates.append({name.split(".", 1)[1]: t for name, t in tensors.items() if "." in name})
    chosen = max(candidates, key=lambda candidate: len(wanted & set(candidate)))
    missing, unexpected = tower.load_state_dict(chosen, strict=False)
    params = dict(tower.named_parameters(remove_duplicate=False))
    tied = {name for name in missing if name in params and any(t is params[name] for n, t in params.items() if n != name)}
    wrong = sorted(set(missing) - tied) or sorted(unexpected)
    if wrong:
        raise ValueError(f"'model.init_from' = '{source}': its {side} tower's weights do not fit the tower built from its "
                         f"config (e.g. '{wrong[0]}'); save the source again with save_pretrained.")


def load_init_from(model: nn.Module, cfg, source: InitSource | None, image_size: int | None = None) -> None:
    """Copy the towers (the sides from the source), their heads and the logit scale/bias of `cfg.init_from`
    into the DualEncoder `model` (in place). CLIPModel sources (`source` None): `load_clip_heads`."""
    if source is None:
        load_clip_heads(model, cfg.init_from)
        return
    state, path = source.state, source.path
    with torch.no_grad():
        for side in _from_source(cfg):
            prefix = f"{side}_tower."
            _load_tower(getattr(model, f"{side}_tower"), {name[len(prefix):]: t for name, t in state.items()
                                                          if name.startswith(prefix)}, side, path)
            head, prefix = getattr(model, f"{side}_projection"), f"{side}_projection."
            weights = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
            if weights:
                shapes = {name: tuple(t.shape) for name, t in head.state_dict().items()}
                if shapes != {name: tuple(t.shape) for name, t in weights.items()}:
                    raise ValueError(f"'model.{side}.projection' does not fit the head of '{path}' (shapes {shapes}); "
                                     "leave model.embed_dim and model.mlp_hidden_dim unset to start from it.")
                head.load_state_dict(weights)
            if side == "image" and image_size is not None:
                from mmcl.models.resolution import resize_position_embeddings

                change = resize_position_embeddings(model.image_tower, image_size, "model.image")
                if change is not None:
                    logging.getLogger("mmcl").warning(change)
        scale = state["logit_scale"].reshape(model.logit_scale.shape)
        if scale.item() > model.logit_scale_max_log + 1e-6:
            raise ValueError(f"'model.init_from' = '{path}' has a logit scale of {scale.exp().item():.1f}, above "
                             f"model.logit_scale_max; set model.logit_scale_max to at least {scale.exp().item():.1f}.")
        model.logit_scale.copy_(scale)
        if model.logit_bias is not None and "logit_bias" in state:
            model.logit_bias.copy_(state["logit_bias"].reshape(model.logit_bias.shape))
