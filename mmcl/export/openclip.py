"""mmcl -> OpenCLIP: what `open_clip.push_to_hf_hub` writes, so OpenCLIP and CLIP_benchmark load mmcl models.

    mmcl export --run RUN --out DIR --format openclip

writes
    DIR/open_clip_config.json        {"model_cfg": OpenCLIP model config, "preprocess_cfg": mean/std/...}
    DIR/open_clip_model.safetensors  the weights in OpenCLIP's CLIP layout
    DIR/tokenizer.json, ...          the run's tokenizer (OpenCLIP's HFTokenizer reads it from DIR)

and loads with `open_clip.create_model_and_transforms('local-dir:DIR')` (or `hf-hub:ORG/NAME`
once pushed) or, with the config registered, `pretrained=DIR/open_clip_model.safetensors`.

Representable: a `clip_vision_model` image tower (CLIPVisionModel, pooled as CLIP does:
pooler_output, the class token after post-LayerNorm) and a `clip_text_model` text tower
(CLIPTextModel, `eos` pooling), both with linear projections, GELU/QuickGELU activations
and LayerNorm eps 1e-5. The text side becomes OpenCLIP's text transformer with `pool_type:
eos` on the tokenizer's EOS id, tokenized by OpenCLIP's HFTokenizer over the run's own
tokenizer. Anything else is refused in one sentence; a written folder has been loaded back with
OpenCLIP and reproduced mmcl's embeddings to 1e-5 on probe inputs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.export.errors import ExportError
from mmcl.export.openclip_import import TOLERANCE, map_tower, relative_diff
from mmcl.export.staging import check_export_out, check_out, staged

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
_ACTS = {"gelu": False, "quick_gelu": True}
LOCAL_TOKENIZER = "local-dir"  # placeholder name: pass repo_id before pushing, for hf-hub: loading
REPORT_NAME = "mmcl_openclip_export.json"  # marks the folder as mmcl's (mmcl.export.staging.OUTPUT_MARKERS)
PROBE_TEXTS = ("a photo of a cat.", "handwritten 7", "a long caption " + " ".join(["that keeps going"] * 40))


def _refuse(what: str) -> None:
    raise ExportError(f"not supported in OpenCLIP format: {what}; export with the default transformers format instead.")


def check_representable(model, config, tokenizer) -> None:
    """Raise ExportError (one sentence) unless OpenCLIP's CLIP class can hold `model` exactly."""
    from transformers import CLIPTextModel, CLIPVisionModel

    if model.text_tower is None:
        _refuse("image-only models (OpenCLIP models have a text tower)")
    vision, text = model.image_tower, model.text_tower
    if type(vision) is not CLIPVisionModel:
        _refuse(f"image tower {type(vision).__name__} (OpenCLIP's own ViT holds clip_vision_model towers only)")
    if type(text) is not CLIPTextModel:
        _refuse(f"text tower {type(text).__name__} (OpenCLIP's CLIP text transformer holds clip_text_model towers only)")
    if model.image_pooling not in ("pooler_output", "auto"):
        _refuse(f"image pooling '{model.image_pooling}' (OpenCLIP pools the class token after the final LayerNorm)")
    if model.text_pooling != "eos":
        _refuse(f"text pooling '{model.text_pooling}' (OpenCLIP pools the EOS token)")
    for kind, head in (("image", model.image_projection), ("text", model.text_projection)):
        if not (isinstance(head, nn.Linear) and head.bias is None):
            _refuse(f"a {type(head).__name__} {kind} projection (OpenCLIP has one bias-free linear projection)")
    if model.logit_bias is not None:
        _refuse("a logit bias with CLIP towers")
    for kind, cfg in (("image", vision.config), ("text", text.config)):
        if cfg.hidden_act not in _ACTS:
            _refuse(f"{kind} activation '{cfg.hidden_act}'")
        if abs(cfg.layer_norm_eps - 1e-5) > 1e-12:
            _refuse(f"{kind} LayerNorm eps {cfg.layer_norm_eps} (OpenCLIP uses 1e-5)")
        if cfg.hidden_size % cfg.num_attention_heads:
            _refuse(f"{kind} width {cfg.hidden_size} not divisible by {cfg.num_attention_heads} heads")
    if vision.config.hidden_act != text.config.hidden_act:
        _refuse("different activations in the two towers (OpenCLIP has one quick_gelu flag)")
    if tokenizer is None or tokenizer.eos_token_id is None:
        _refuse("a tokenizer without an EOS token (OpenCLIP's text transformer pools the EOS token)")


def openclip_model_config(model, config, tokenizer, repo_id: str | None = None) -> dict[str, Any]:
    """The OpenCLIP model config (`model_cfg`) of a representable DualEncoder.

    repo_id: the Hub repo the folder will be pushed to; OpenCLIP's `hf-hub:` loading reads the
    tokenizer from `hf_tokenizer_name` (`local-dir:` loading reads it from the folder whatever its value).
    """
    vision, text = model.image_tower.config, model.text_tower.config
    return {
        "embed_dim": config.model.embed_dim,
        "quick_gelu": _ACTS[vision.hidden_act],
        "vision_cfg": {
            "image_size": vision.image_size, "layers": vision.num_hidden_layers, "width": vision.hidden_size,
            "head_width": vision.hidden_size // vision.num_attention_heads, "patch_size": vision.patch_size,
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        },
        "text_cfg": {
            "context_length": config.model.text.context_length, "vocab_size": text.vocab_size, "width": text.hidden_size,
            "heads": text.num_attention_heads, "layers": text.num_hidden_layers,
            "mlp_ratio": text.intermediate_size / text.hidden_size,
            # mmcl's `eos` pooling is the last token the mask keeps, which the tokenizer makes its EOS.
            "pool_type": "eos", "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
            # makes OpenCLIP tokenize with HFTokenizer over the tokenizer saved next to this config
            "hf_tokenizer_name": repo_id or LOCAL_TOKENIZER,
        },
    }


def openclip_state(model, context_length: int) -> dict[str, torch.Tensor]:
    """The DualEncoder's weights under OpenCLIP CLIP's names and layouts (the inverse of openclip_import's map)."""
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    for tower, inner in (("image_tower", "vision_model"), ("text_tower", "text_model")):
        # transformers 4 names the inner module (vision_model.*), transformers 5 does not
        for name, tensor in getattr(model, tower).state_dict().items():
            state[f"{tower}.{name.removeprefix(inner + '.')}"] = tensor.detach().float().cpu()
    out = {
        **map_tower(state, "image", "image_tower", model.image_tower.config.num_hidden_layers, to_openclip=True),
        **map_tower(state, "text", "text_tower", model.text_tower.config.num_hidden_layers, to_openclip=True),
        "visual.proj": state["image_projection.weight"].t(),
        "text_projection": state["text_projection.weight"].t(),
        # OpenCLIP clamps the parameter in training; mmcl clamps in the forward pass: store the value in use.
        "logit_scale": state["logit_scale"].reshape(()).clamp(max=model.logit_scale_max_log),
    }
    # mmcl feeds context_length positions; OpenCLIP would interpolate a longer table to its context length
    out["positional_embedding"] = out["positional_embedding"][:context_length]
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def preprocess_config(config) -> dict[str, Any]:
    from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

    return {"mean": list(config.data.image_mean or CLIP_MEAN), "std": list(config.data.image_std or CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def export_openclip_model(model, config, tokenizer, out_dir: str | Path, overwrite: bool = False,
                          repo_id: str | None = None) -> Path:
    """Write an in-memory DualEncoder (RunConfig `config`, its tokenizer) in OpenCLIP's hub layout; returns the folder."""
    import copy

    from safetensors.torch import save_file

    out = check_out(out_dir, overwrite=overwrite)
    model = model.float().eval().cpu()
    for tower in (model.image_tower, model.text_tower):  # LoRA adapters: folded into the towers' weights
        if tower is not None:
            from mmcl.models.lora import has_lora, merge_lora

            if has_lora(tower):
                merge_lora(tower)
    check_representable(model, config, tokenizer)
    with staged(out) as staging:
        save_file(openclip_state(model, config.model.text.context_length), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = config.model.text.context_length
        tokenizer.save_pretrained(str(staging))
        hub_config = {"model_cfg": openclip_model_config(model, config, tokenizer, repo_id), "preprocess_cfg": preprocess_config(config)}
        (staging / CONFIG_NAME).write_text(json.dumps(hub_config, indent=2) + "\n")
        differences = verify(staging, model, config, tokenizer)
        (staging / REPORT_NAME).write_text(json.dumps({"max_relative_diff": differences,
                                                                       "tolerance": TOLERANCE}, indent=2) + "\n")
    return out


def verify(folder: Path, model, config, tokenizer) -> dict[str, float]:
    """Load `folder` with open_clip and compare its embeddings with mmcl's on probe inputs."""
    import open_clip

    from mmcl.models import tokenize

    oc_model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device="cpu")
    oc_model.eval()
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    size = config.data.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = tokenize(tokenizer, list(PROBE_TEXTS), config.model.text.context_length)
    with torch.no_grad():
        differences = {
            "image": relative_diff(model.encode_image(pixels, normalize=False), oc_model.encode_image(pixels)),
            "text": relative_diff(model.encode_text(ours["input_ids"], ours["attention_mask"], normalize=False),
                                  oc_model.encode_text(oc_tokenizer(list(PROBE_TEXTS)))),
        }
    if not max(differences.values()) <= TOLERANCE:
        raise ExportError(f"OpenCLIP does not reproduce the model from {folder} (image {differences['image']:.1e}, text "
                          f"{differences['text']:.1e}); this is a bug in mmcl's OpenCLIP export, please report it.")
    return differences


def export_openclip(run_or_checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False,
                    repo_id: str | None = None, trust_checkpoint: bool = False) -> Path:
    """`mmcl export --format openclip`: a run directory, checkpoint or model dir -> OpenCLIP folder."""
    from mmcl.export.source import load_model

    out, source = check_export_out(run_or_checkpoint, out_dir, overwrite=overwrite, trust_checkpoint=trust_checkpoint)
    model, config, tokenizer = load_model(source)
    return export_openclip_model(model, config, tokenizer, out, overwrite=overwrite, repo_id=repo_id)
