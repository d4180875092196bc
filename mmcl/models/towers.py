"""Build one tower — any `transformers` model — from a `TowerConfig`.

A tower is pretrained (`name_or_path`: a local directory or a hub id) or randomly
initialised from an inline config dict (`config`, which names a `model_type`). The class
is chosen this way:

- `model_class` set: that `transformers` class (e.g. `CLIPVisionModelWithProjection`).
- text towers: `AutoModelForTextEncoding` when it knows the model type, so T5/mT5 give
  their encoder only; otherwise `AutoModel`.
- image towers: `AutoModel`.
- a two-tower checkpoint (CLIP, SigLIP: a config with `vision_config`/`text_config`) used
  as one tower gives the matching single tower (e.g. `CLIPVisionModel` for the image side);
  the other tower's weights are ignored.

Weights are loaded in float32 whatever the checkpoint stores: mixed precision is the
engine's job, and the optimizer's master weights must be full precision.

A pretrained image tower asked to run at another `image_size` than its checkpoint's gets its
position table interpolated once, here (`mmcl.models.resolution`).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING, MODEL_MAPPING

from mmcl.models.settings import TowerConfig
from mmcl.models.resolution import ResolutionError, resize_position_embeddings

Kind = Literal["image", "text"]
logger = logging.getLogger("mmcl")

INPUT_NAME = {"image": "pixel_values", "text": "input_ids"}  # the tower's `main_input_name`
SUB_CONFIG = {"image": "vision_config", "text": "text_config"}  # its part of a two-tower config
EXAMPLES = {"image": "vit, clip_vision_model, siglip2_vision_model or convnext",
            "text": "bert, roberta, clip_text_model, siglip2_text_model or t5"}

# transformers renamed `torch_dtype` to `dtype` in 4.56.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# What a failed load raises: missing files/ids (OSError), bad configs (ValueError, KeyError,
# TypeError, AttributeError), shape mismatches (RuntimeError), missing optional packages (ImportError).
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError)


class TowerLoadError(ValueError):
    """A tower that cannot be built; the message is one sentence naming the config key."""


def build_tower(cfg: TowerConfig, kind: Kind, key: str | None = None, image_size: int | None = None) -> PreTrainedModel:
    """Build the image or text tower described by `cfg`.

    `key` names the config section in error messages (default `model.<kind>`). `image_size`
    (image towers loaded by `name_or_path`): the side the tower will see; a checkpoint
    trained at another size gets its position embeddings interpolated. Raises
    `TowerLoadError` when the model cannot be loaded or does not take the kind's input
    (`pixel_values` for images, `input_ids` for text).
    """
    key = key or f"model.{kind}"
    model_class = _named_class(cfg.model_class, f"{key}.model_class") if cfg.model_class else None
    kwargs: dict[str, Any] = {_DTYPE_KWARG: torch.float32}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation

    if cfg.name_or_path is not None:
        source, value = f"{key}.name_or_path", cfg.name_or_path
        try:
            config = _select_config(AutoConfig.from_pretrained(value), kind, model_class)
            cls = model_class or _default_class(config, kind, source)
            tower, info = cls.from_pretrained(value, config=config, output_loading_info=True, **kwargs)
        except TowerLoadError:
            raise
        except _LOAD_ERRORS as error:
            raise TowerLoadError(
                f"'{source}' = '{value}' could not be loaded ({_reason(error)}); give a local directory holding "
                "config.json and weights, or an existing Hugging Face hub id (downloading needs HF_HUB_OFFLINE unset)."
            ) from error
        _check_weights_loaded(tower, set(info["missing_keys"]), source, value, key)
        if kind == "image" and image_size is not None:
            try:
                change = resize_position_embeddings(tower, image_size, key)
            except ResolutionError as error:
                raise TowerLoadError(str(error)) from error
            if change is not None:
                logger.warning(change)
    elif cfg.config is not None:
        source = f"{key}.config"
        options = dict(cfg.config)
        model_type = options.pop("model_type", None)
        try:
            config = _select_config(AutoConfig.for_model(model_type, **options), kind, model_class)
            cls = model_class or _default_class(config, kind, source)
            tower = cls._from_config(config, **kwargs)
        except TowerLoadError:
            raise
        except _LOAD_ERRORS as error:
            raise TowerLoadError(
                f"'{source}' (model_type '{model_type}') could not build a model ({_reason(error)}); fix the "
                f"config values or use a transformers model type such as {EXAMPLES[kind]}."
            ) from error
    else:
        raise TowerLoadError(f"'{key}' needs one of 'name_or_path' (pretrained) or 'config' (random init).")

    if tower.main_input_name != INPUT_NAME[kind]:
        raise TowerLoadError(
            f"'{key}' gives {type(tower).__name__}, which takes {tower.main_input_name} rather than "
            f"{INPUT_NAME[kind]}; use a {kind} model such as {EXAMPLES[kind]}."
        )
    return tower


def _check_weights_loaded(tower: PreTrainedModel, missing: set[str], source: str, value: str, key: str) -> None:
    """A few missing weights are normal (BERT's pooler); most missing means a random tower, never what was meant."""
    sizes = {name: p.numel() for name, p in tower.named_parameters()}
    lost = sum(size for name, size in sizes.items() if name in missing)
    if lost * 2 > sum(sizes.values()):
        example = next(name for name in sizes if name in missing)
        raise TowerLoadError(
            f"'{source}' = '{value}' has no weights for most of {type(tower).__name__} (e.g. '{example}'); set "
            f"'{key}.model_class' to the class its checkpoint was saved from, or leave it unset."
        )


def _named_class(name: str, source: str) -> type[PreTrainedModel]:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise TowerLoadError(
            f"'{source}' = '{name}' is not a transformers model class; use a class name such as "
            "CLIPVisionModelWithProjection or BertModel, or leave it unset."
        )
    return cls


def _select_config(config: PretrainedConfig, kind: Kind, model_class: type[PreTrainedModel] | None) -> PretrainedConfig:
    """The tower's own config: the `vision_config`/`text_config` part of a two-tower config."""
    wanted = getattr(model_class, "config_class", None)
    if wanted is not None and isinstance(config, wanted):
        return config
    sub = getattr(config, SUB_CONFIG[kind], None) if SUB_CONFIG[kind] in getattr(config, "sub_configs", {}) else None
    if isinstance(sub, PretrainedConfig) and (wanted is None or isinstance(sub, wanted)):
        return sub
    if wanted is not None:  # e.g. a ViT config for CLIPVisionModel: let the class read the values it knows
        return wanted.from_dict(config.to_dict())
    return config


# Single towers that transformers' Auto mappings leave out (they map only the two-tower model).
_UNMAPPED_TOWERS = {"siglip_text_model": "SiglipTextModel", "siglip2_text_model": "Siglip2TextModel"}


def _default_class(config: PretrainedConfig, kind: Kind, source: str) -> type[PreTrainedModel]:
    if config.model_type in _UNMAPPED_TOWERS:
        return getattr(transformers, _UNMAPPED_TOWERS[config.model_type])
    mappings = (MODEL_FOR_TEXT_ENCODING_MAPPING, MODEL_MAPPING) if kind == "text" else (MODEL_MAPPING,)
    for mapping in mappings:
        try:
            return mapping[type(config)]
        except KeyError:
            continue
    raise TowerLoadError(
        f"'{source}': transformers has no base model for model_type '{config.model_type}'; set "
        f"'{source.rsplit('.', 1)[0]}.model_class' to the class to use."
    )


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
