"""The `model` section of a run config: the towers, the shared embedding space, the logit scale/bias.

Field comments document the keys (README's configuration reference is generated from them).
Imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmcl.coerce import MODEL_PATH, ConfigError, bounded, count, nonnegative, positive


@dataclass
class LoraConfig:
    """LoRA adapters on a tower through Hugging Face `peft`: the tower's own weights stay frozen."""

    rank: int = count(8)  # rank r of each adapter's low-rank update
    alpha: float = positive(16.0)  # the update is scaled by alpha / rank
    dropout: float = bounded(0.0, 0, 1, high_open=True)  # dropout on the adapters' input in training
    # names of the Linear modules to adapt (peft's target_modules: leaf names such as query, value, q_proj);
    # None: the attention query and value projections of the tower's layer stack (q_proj/v_proj for CLIP and
    # SigLIP, query/value for ViT and BERT, q/v for T5), or every Linear in the stack when it has no attention
    target_modules: list[str] | None = None


@dataclass
class TowerConfig:
    """One tower: any `transformers` model, pretrained (`name_or_path`) or random (`config`)."""

    name_or_path: str | None = field(default=None, metadata=MODEL_PATH)  # local dir or hub id, loaded with Auto classes
    config: dict[str, Any] | None = None  # inline transformers config (needs `model_type`); random init
    model_class: str | None = None  # optional transformers class name, e.g. CLIPVisionModelWithProjection
    pooling: Literal["auto", "cls", "mean", "pooler_output", "eos", "embeds"] = "auto"  # how tokens become one vector
    projection: Literal["linear", "mlp", "none"] = "linear"  # head to the shared embedding space
    lock: bool = False  # freeze the tower (LiT); with unlocked_layers > 0 only its first layers
    unlocked_layers: int = nonnegative(0)  # with lock: keep the last N layers (and the norms after them) trainable
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # "eager" / "sdpa" / ...; unset: SDPA, except eager when training on the CPU in bf16 at <= 160 tokens (faster there)
    attn_implementation: str | None = None
    # image towers with token outputs (vit, deit, clip/siglip vision, dinov2): in training, drop this fraction
    # of the patch tokens per image after the position embeddings (FLIP); class/register tokens are kept
    patch_dropout: float = bounded(0.0, 0, 1, high_open=True)
    # LoRA adapters (peft): only they (and the projection) train; the export merges them into the tower
    lora: LoraConfig | None = None

    def validate(self, key: str, source: str) -> None:
        if self.lora is not None and self.lock:
            raise ConfigError(f"{source}: '{key}.lora' trains adapters on a tower that 'lock: true' freezes entirely; "
                              "remove one of them.")
        if (self.name_or_path is None) == (self.config is None):
            raise ConfigError(f"{source}: '{key}' needs exactly one of 'name_or_path' (pretrained) or 'config' (random init).")
        if self.config is not None and "model_type" not in self.config:
            raise ConfigError(f"{source}: '{key}.config' needs a 'model_type' (e.g. vit, bert, clip_vision_model).")
        if self.unlocked_layers and not self.lock:
            raise ConfigError(f"{source}: '{key}.unlocked_layers' only applies with '{key}.lock: true'.")
        if self.patch_dropout and self.lock and not self.unlocked_layers:
            raise ConfigError(f"{source}: '{key}.patch_dropout' has no effect on a fully locked tower (it stays in eval "
                              "mode); set it to 0 or set 'unlocked_layers'.")


@dataclass
class TextTowerConfig(TowerConfig):
    """A text tower plus its tokenizer."""

    tokenizer: str | None = field(default=None, metadata=MODEL_PATH)  # AutoTokenizer dir or hub id; default name_or_path
    context_length: int = count(77)  # tokens per caption after padding/truncation

    def validate(self, key: str, source: str) -> None:
        super().validate(key, source)
        if self.patch_dropout:
            raise ConfigError(f"{source}: '{key}.patch_dropout' applies to image towers only; remove it.")
        if self.tokenizer is None and self.name_or_path is None:
            raise ConfigError(f"{source}: '{key}.tokenizer' is required when the text tower is built from an inline config.")


@dataclass
class ModelConfig:
    """The dual encoder: image tower, text tower, shared embedding space, logit scale/bias."""

    image: TowerConfig  # required
    text: TextTowerConfig | None = None  # None for image-only (SSL) runs
    embed_dim: int = count(512)  # shared embedding dimension
    mlp_hidden_dim: int | None = count(None)  # hidden width of `mlp` projections; default max(tower width, embed_dim)
    logit_scale_init: float = positive(1 / 0.07)  # initial multiplier of the cosine similarities (CLIP: 1/0.07)
    logit_scale_max: float = positive(100.0)  # the effective multiplier is clamped to this in the forward pass
    logit_bias_init: float | None = None  # learnable logit bias (sigmoid loss; SigLIP uses -10); None = no bias
    # a pretrained two-tower model to start from: a transformers CLIPModel (e.g. from `mmcl convert openclip`),
    # SiglipModel or VisionTextDualEncoderModel folder or hub id, an `mmcl export` folder or an mmcl model dir;
    # both towers, their projections, the logit scale (and bias) start from it; fills in each tower's
    # name_or_path, pooling and projection, embed_dim, logit_bias_init/logit_scale_max (SigLIP),
    # text.context_length and text.tokenizer, data.image_size/image_mean/image_std where they are not set
    init_from: str | None = field(default=None, metadata=MODEL_PATH)

    def validate(self, key: str, source: str) -> None:
        if self.logit_scale_max < self.logit_scale_init:
            raise ConfigError(f"{source}: 'model.logit_scale_init' must be positive and at most 'model.logit_scale_max'.")
