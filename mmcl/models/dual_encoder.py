"""The dual encoder: image tower (+ optional text tower) -> pooler -> projection -> unit vectors.

Attribute names are stable so optimizers can group parameters by prefix: `image_tower`,
`image_projection`, `text_tower`, `text_projection`, `logit_scale`, `logit_bias`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mmcl.models.settings import ModelConfig, TowerConfig
from mmcl.models.locking import eval_frozen_modules, lock_tower
from mmcl.models.patch_dropout import attach_patch_dropout
from mmcl.models.pooling import pool, pooled_width, resolve_pooling
from mmcl.models.projection import build_projection
from mmcl.models.towers import build_tower


class DualEncoder(nn.Module):
    """CLIP-style model over `transformers` towers.

    `logit_scale` is a learnable scalar stored as a log; the value returned by `forward`
    is exp(min(logit_scale, ln(logit_scale_max))). Clamping in the forward pass (OpenCLIP
    clamps the parameter in place after each step instead) holds whatever the optimizer and
    however ZeRO partitions the parameter; above the cap the parameter gets no gradient.
    """

    def __init__(
        self,
        image_tower: PreTrainedModel,
        image_projection: nn.Module,
        image_pooling: str,
        text_tower: PreTrainedModel | None = None,
        text_projection: nn.Module | None = None,
        text_pooling: str | None = None,
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100.0,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.image_projection = image_projection
        self.image_pooling = image_pooling
        self.text_tower = text_tower
        self.text_projection = text_projection
        self.text_pooling = text_pooling
        # Shape [1], not []: DeepSpeed's parameter broadcast over gloo cannot handle 0-dim tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(logit_scale_init)))
        self.logit_scale_max_log = math.log(logit_scale_max)
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.full((1,), float(logit_bias_init)))
        self.train()  # from_pretrained leaves towers in eval mode; this also settles frozen parts

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_size: int | None = None) -> DualEncoder:
        """Build towers, poolers and heads from `cfg`, then apply locking and checkpointing.

        `image_size` (the run's `data.image_size`): a pretrained image tower saved at another
        size gets its position embeddings interpolated to it (`mmcl.models.resolution`).
        """
        image_tower, image_pooling, image_projection = _build_side(cfg.image, "image", cfg, image_size)
        text_tower = text_pooling = text_projection = None
        if cfg.text is not None:
            text_tower, text_pooling, text_projection = _build_side(cfg.text, "text", cfg)
            _check_context_length(text_tower, cfg.text.context_length)
        return cls(
            image_tower,
            image_projection,
            image_pooling,
            text_tower,
            text_projection,
            text_pooling,
            logit_scale_init=cfg.logit_scale_init,
            logit_scale_max=cfg.logit_scale_max,
            logit_bias_init=cfg.logit_bias_init,
        )

    def train(self, mode: bool = True) -> DualEncoder:
        """`nn.Module.train`, except that fully frozen submodules always stay in eval mode."""
        super().train(mode)
        if mode:
            eval_frozen_modules(self)
        return self

    def pooled_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                              spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> the image tower's pooled output [B, W] (before the projection).

        NaFlex towers (SigLIP 2) take pixel_values [B, L, 3*P*P] with pixel_attention_mask [B, L]
        and spatial_shapes [B, 2] (`mmcl.data.naflex`). These are the "backbone features" that the
        self-supervised heads (SimCLR, BYOL) read.
        """
        if spatial_shapes is None:
            return pool(self.image_tower(pixel_values=pixel_values), self.image_pooling, "image")
        outputs = self.image_tower(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                                   spatial_shapes=spatial_shapes)
        return pool(outputs, self.image_pooling, "image")

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True,
                     pixel_attention_mask: torch.Tensor | None = None,
                     spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, 3, H, W] (or NaFlex patches, see `pooled_image_features`) -> image
        features [B, embed_dim] (unit rows if `normalize`)."""
        features = self.image_projection(self.pooled_image_features(pixel_values, pixel_attention_mask, spatial_shapes))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, L] -> text features [B, embed_dim] (unit rows if `normalize`).

        A missing attention mask means no padding.
        """
        if self.text_tower is None:
            raise ValueError("this model has no text tower (model.text is not set).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.text_tower(input_ids=input_ids, attention_mask=attention_mask)
        features = self.text_projection(pool(outputs, self.text_pooling, "text", attention_mask))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        views: list[torch.Tensor] | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode what is given.

        NaFlex image inputs (SigLIP 2): pixel_values [B, L, 3*P*P] with pixel_attention_mask [B, L]
        and spatial_shapes [B, 2].

        Returns `image_features` [B, D] (with pixel_values), `text_features` [B, D] (with
        input_ids), `view_features` [V*B, W] (with views: V augmented batches [B, 3, H, W],
        their pooled tower outputs before the projection, view after view), `logit_scale`
        (scalar, already exponentiated and clamped) and `logit_bias` (scalar, when configured).
        Images and views of one size go through the image tower in one call.
        """
        out: dict[str, torch.Tensor] = {}
        if views and spatial_shapes is not None:
            raise ValueError("views (SSL objectives) are square crops and cannot be combined with NaFlex pixel_values.")
        if views:
            images = ([pixel_values] if pixel_values is not None else []) + list(views)
            if all(image.shape[1:] == images[0].shape[1:] for image in images):
                pooled = self.pooled_image_features(torch.cat(images))
            else:
                pooled = torch.cat([self.pooled_image_features(image) for image in images])
            if pixel_values is not None:
                batch = pixel_values.shape[0]
                out["image_features"] = F.normalize(self.image_projection(pooled[:batch]), dim=-1)
                pooled = pooled[batch:]
            out["view_features"] = pooled
        elif pixel_values is not None:
            out["image_features"] = self.encode_image(pixel_values, pixel_attention_mask=pixel_attention_mask,
                                                      spatial_shapes=spatial_shapes)
        if input_ids is not None:
            out["text_features"] = self.encode_text(input_ids, attention_mask)
        out["logit_scale"] = self.logit_scale.clamp(max=self.logit_scale_max_log).exp().squeeze(0)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.squeeze(0)
        return out


def build_model(cfg: ModelConfig, image_size: int | None = None) -> DualEncoder:
    """`DualEncoder.from_config(cfg, image_size)`. A config with `init_from` is built by
    `mmcl.pretrained.build_model`, which reads the source (exports sit above the models)."""
    if cfg.init_from is not None:
        raise ValueError("a model config with 'init_from' is built by mmcl.pretrained.build_model, which loads the source.")
    return DualEncoder.from_config(cfg, image_size)


def _build_side(tower_cfg: TowerConfig, kind: str, cfg: ModelConfig,
                image_size: int | None = None) -> tuple[PreTrainedModel, str, nn.Module]:
    key = f"model.{kind}"
    tower = build_tower(tower_cfg, kind, key, image_size=image_size if kind == "image" else None)
    if tower_cfg.patch_dropout:  # training-time token dropping (FLIP); a config error where it cannot apply
        attach_patch_dropout(tower, tower_cfg.patch_dropout, f"{key}")
    try:
        pooling = resolve_pooling(tower, kind, tower_cfg.pooling)
        width = pooled_width(tower, pooling)
    except ValueError as error:
        raise ValueError(f"'{key}.pooling': {error}") from error
    projection = build_projection(tower_cfg.projection, width, cfg.embed_dim, cfg.mlp_hidden_dim, key)
    if tower_cfg.lock:
        lock_tower(tower, tower_cfg.unlocked_layers, key)
    if tower_cfg.lora is not None:  # after pooling/projection sizing: adapters change no shape
        add_tower_lora(tower, tower_cfg, key)
    if tower_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(tower, key)
    return tower, pooling, projection


def add_tower_lora(tower: PreTrainedModel, tower_cfg: TowerConfig, key: str) -> None:
    """LoRA adapters (`tower_cfg.lora`) into `tower`, in place, with the global RNG left as it was:
    a run with adapters builds the same towers and heads from one seed as a run without."""
    from mmcl.models.lora import add_lora

    with torch.random.fork_rng(devices=[]):
        add_lora(tower, tower_cfg.lora, key)


def enable_gradient_checkpointing(tower: PreTrainedModel, key: str = "model.image") -> None:
    """Recompute `tower`'s layer activations in backward (non-reentrant checkpointing)."""
    if not tower.supports_gradient_checkpointing:
        raise ValueError(
            f"'{key}.gradient_checkpointing' is true but {type(tower).__name__} does not support gradient "
            "checkpointing; set it to false."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(tower, "activation_checkpointing_enable"):  # newer transformers deprecate the old name
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _check_context_length(tower: PreTrainedModel, context_length: int) -> None:
    """Fail at build time, not in the first step, when captions outrun the position table."""
    limit = getattr(tower.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return  # relative positions (T5) or none
    padding_idx = getattr(getattr(tower, "embeddings", None), "padding_idx", None)
    if isinstance(padding_idx, int):  # RoBERTa-style positions start after padding_idx
        limit -= padding_idx + 1
    if context_length > limit:
        raise ValueError(
            f"'model.text.context_length' = {context_length} exceeds the text tower's {limit} positions; "
            f"lower it to {limit} or raise max_position_embeddings."
        )
