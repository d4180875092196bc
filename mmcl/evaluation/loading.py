"""Models for evaluation behind one small interface.

An mmcl model directory (`mmcl.model_dir`) or an open_clip architecture with local weights
becomes an `EvalModel`; see `load_eval_model`.

`EvalModel` is what the evaluation commands use: `encode_image(pixel_values) -> [B, D]`,
`encode_text(texts) -> [B, D]` (both L2-normalised), `transform` (PIL image -> [3, H, W]; for a SigLIP 2
NaFlex model, packed patches [L + 1, 3*P*P], see `image_inputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.data.transforms import CLIP_MEAN, CLIP_STD
from mmcl.model_dir import load_mmcl_model_dir


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


def image_inputs(data: Any) -> tuple[Callable[[Any], Tensor], Callable[[Tensor], dict[str, Tensor]]]:
    """(PIL image -> tensor, stacked batch -> `encode_image` keyword arguments) for a run's `data` config.

    Square towers: `eval_transform` at data.image_size, and {"pixel_values": batch}. NaFlex towers
    (data.naflex): each image as patches at data.naflex.max_num_patches, as the export's
    processor gives them, packed into one tensor per image (`mmcl.data.naflex.NaFlexEvalTransform`) and
    unpacked into pixel_values, pixel_attention_mask and spatial_shapes.
    """
    naflex = getattr(data, "naflex", None)
    if naflex is None:
        return eval_transform(data.image_size, data.image_mean, data.image_std), lambda batch: {"pixel_values": batch}
    from mmcl.data.naflex import NaFlexEvalTransform, unpack_naflex

    return (NaFlexEvalTransform(naflex.patch_size, naflex.max_num_patches, data.image_mean or CLIP_MEAN,
                                data.image_std or CLIP_STD), unpack_naflex)


def text_encoder(model: Any, tokenizer: Any, context_length: int, device: torch.device | str = "cpu"):
    """A texts -> [B, D] callable for an mmcl DualEncoder (normalised features, no grad)."""
    from mmcl.models import tokenize

    @torch.no_grad()
    def encode(texts: list[str]) -> Tensor:
        tokens = tokenize(tokenizer, texts, context_length)
        return F.normalize(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float(), dim=-1)

    return encode


def mmcl_eval_model(path: str | Path, device: torch.device | str = "cpu") -> EvalModel:
    """EvalModel for an mmcl model directory."""
    model, config, tokenizer = load_mmcl_model_dir(path, device)
    transform, unpack = image_inputs(config.data)

    @torch.no_grad()
    def encode_image(pixel_values: Tensor) -> Tensor:
        return F.normalize(model.encode_image(**unpack(pixel_values.to(device))).float(), dim=-1)

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
