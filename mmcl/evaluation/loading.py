"""Models for evaluation behind one small interface, and the mmcl model directory format.

An **mmcl model directory** holds
    config.yaml        the resolved RunConfig (`mmcl.config.save_config`); towers that were
                       loaded from `name_or_path` are written with their inline transformers
                       `config` instead, so the directory loads without the original weights
    model.safetensors  the DualEncoder's full state_dict (every name, tied weights included)
    tokenizer/         optional; a `save_pretrained` tokenizer that overrides model.text.tokenizer
`save_model_dir` writes one, `load_mmcl_model_dir` reads it. Training checkpoints
(DeepSpeed) and `transformers` exports are not model directories; see `load_eval_model`.

`EvalModel` is what the evaluation commands use: `encode_image(pixel_values) -> [B, D]`,
`encode_text(texts) -> [B, D]` (both L2-normalised), `transform` (PIL image -> [3, H, W]).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class EvalModel:
    """A frozen image-text model on one device, ready for evaluation."""

    encode_image: Callable[[Tensor], Tensor]  # [B, 3, H, W] -> [B, D], normalised
    encode_text: Callable[[list[str]], Tensor]  # B strings -> [B, D], normalised
    transform: Callable[[Any], Tensor]  # PIL image -> [3, H, W]
    name: str  # "model" in the result JSON
    pretrained: str  # "pretrained" in the result JSON (weights path or "random")
    device: torch.device
    module: torch.nn.Module | None = None  # the underlying model (DualEncoder / open_clip CLIP)


def eval_transform(image_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """PIL image -> normalised float [3, S, S]: bicubic resize of the shorter side, centre crop
    (mmcl.data's torchvision reference of CLIP's eval transform; mean/std default to CLIP's)."""
    from mmcl.data.transforms import torchvision_eval_transform

    return torchvision_eval_transform(image_size, mean or CLIP_MEAN, std or CLIP_STD)


def text_encoder(model: Any, tokenizer: Any, context_length: int, device: torch.device | str = "cpu"):
    """A texts -> [B, D] callable for an mmcl DualEncoder (normalised features, no grad)."""
    from mmcl.models import tokenize

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        tokens = tokenize(tokenizer, texts, context_length)
        return F.normalize(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float(), dim=-1)

    return encode


# ----------------------------------------------------------------------------- mmcl model dirs


def save_model_dir(model: torch.nn.Module, config: Any, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Write an mmcl model directory (see the module docstring) and return its path.

    model: a DualEncoder; config: the RunConfig it was built from; tokenizer: a
    `transformers` tokenizer (saved to tokenizer/) or None.
    """
    from safetensors.torch import save_file

    from mmcl.config import save_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(_self_contained(config, model, (out / TOKENIZER_DIR) if tokenizer is not None else None), out / CONFIG_FILE)
    # Own copies: under DeepSpeed ZeRO the parameters are views into one flat buffer (which
    # safetensors refuses to save); tied weights are simply stored under each of their names.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


# Keys of a transformers config that describe where it came from, not the architecture (and
# id2label, whose int keys a RunConfig cannot hold; it only matters for classification heads).
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "id2label", "label2id")


def _self_contained(config: Any, model: torch.nn.Module, tokenizer_dir: Path | None) -> Any:
    """A copy of `config` whose towers are inline transformers configs (no external weights needed)."""
    import copy

    config = copy.deepcopy(config)
    sides = [("image", config.model.image, getattr(model, "image_tower", None))]
    if config.model.text is not None:
        sides.append(("text", config.model.text, getattr(model, "text_tower", None)))
    for side, tower_cfg, tower in sides:
        if tower_cfg.name_or_path is None or not hasattr(getattr(tower, "config", None), "to_diff_dict"):
            continue
        inline = {k: v for k, v in tower.config.to_diff_dict().items() if k not in _PROVENANCE_KEYS}
        if side == "text" and tower_cfg.tokenizer is None and tokenizer_dir is None:
            tower_cfg.tokenizer = tower_cfg.name_or_path  # the tokenizer still comes from there
        tower_cfg.config, tower_cfg.name_or_path = inline, None
    if tokenizer_dir is not None and config.model.text is not None:
        config.model.text.tokenizer = str(tokenizer_dir.resolve())
    config.model.init_from = None  # model.safetensors holds every weight, heads and logit scale included
    return config


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_mmcl_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any, Any]:
    """(DualEncoder in eval mode on `device`, RunConfig, tokenizer or None) from a model directory."""
    import yaml
    from safetensors.torch import load_file

    from mmcl.config import from_dict

    path = Path(path)
    _check_model_dir(path)
    raw = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    if (path / TOKENIZER_DIR).is_dir() and raw.get("model", {}).get("text"):
        raw["model"]["text"]["tokenizer"] = str(path / TOKENIZER_DIR)
    config = from_dict(raw, source=str(path / CONFIG_FILE))
    try:
        from mmcl.models import build_model, build_tokenizer
    except ImportError as error:
        raise RuntimeError(f"mmcl.models is not available ({error}); it is needed to load {path}.") from error
    model = build_model(config.model)
    # Every name is stored (tied weights under each of their names), so a plain strict check works.
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS_FILE} does not match the model in {CONFIG_FILE} "
            f"({len(missing)} missing keys, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})."
        )
    tokenizer = build_tokenizer(config.model.text) if config.model.text is not None else None
    return model.to(device).eval(), config, tokenizer


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist.")
    if is_model_dir(path):
        return
    if (path / "latest").is_file() or list(path.glob("global_step*")):
        raise ValueError(f"{path} is a DeepSpeed training checkpoint, not an mmcl model directory; export it first (not supported yet).")
    if (path / "config.json").is_file():
        raise ValueError(f"{path} looks like a transformers export; loading those for evaluation is not supported yet — pass an mmcl model directory ({CONFIG_FILE} + {WEIGHTS_FILE}).")
    raise ValueError(f"{path} is not an mmcl model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}.")


def mmcl_eval_model(path: str | Path, device: torch.device | str = "cpu") -> EvalModel:
    """EvalModel for an mmcl model directory."""
    model, config, tokenizer = load_mmcl_model_dir(path, device)
    transform = eval_transform(config.data.image_size, config.data.image_mean, config.data.image_std)

    @torch.no_grad()
    def encode_image(pixel_values: Tensor) -> Tensor:
        return F.normalize(model.encode_image(pixel_values.to(device)).float(), dim=-1)

    def no_text_tower(texts: list[str]) -> Tensor:
        raise ValueError(f"{path} has no text tower; only kNN and linear probes can evaluate it.")

    return EvalModel(
        encode_image=encode_image,
        encode_text=no_text_tower if tokenizer is None else text_encoder(model, tokenizer, config.model.text.context_length, device),
        transform=transform,
        name=Path(path).name,
        pretrained=str(path),
        device=torch.device(device),
        module=model,
    )


# ----------------------------------------------------------------------------- open_clip


def openclip_eval_model(
    model_name: str, weights: str | None = None, device: torch.device | str = "cpu", config_file: str | None = None
) -> EvalModel:
    """EvalModel for an open_clip architecture with local weights (None = random init).

    config_file: an extra open_clip model config JSON to register first (its file stem is
    the model name), for architectures open_clip does not ship.
    """
    import open_clip

    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"open_clip model config {config_file} does not exist.")
        open_clip.add_model_config(config_file)
    if model_name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model '{model_name}'; see open_clip.list_models() or pass --openclip-config.")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip weights file {weights} does not exist.")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def encode_image(pixel_values: Tensor) -> Tensor:
        return model.encode_image(pixel_values.to(device), normalize=True).float()

    @torch.no_grad()
    def encode_text(texts: list[str]) -> Tensor:
        return model.encode_text(tokenizer(texts).to(device), normalize=True).float()

    return EvalModel(encode_image, encode_text, preprocess, model_name, weights or "random", torch.device(device), model)


def load_eval_model(
    model_dir: str | None = None,
    openclip_model: str | None = None,
    openclip_weights: str | None = None,
    openclip_config: str | None = None,
    device: torch.device | str = "cpu",
) -> EvalModel:
    """Exactly one of `model_dir` (mmcl) or `openclip_model` must be given."""
    if (model_dir is None) == (openclip_model is None):
        raise ValueError("give exactly one model: --model DIR (an mmcl model directory) or --openclip-model NAME.")
    if model_dir is not None:
        return mmcl_eval_model(model_dir, device)
    return openclip_eval_model(openclip_model, openclip_weights, device, openclip_config)
