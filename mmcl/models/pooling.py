"""Poolers: a tower's output (tokens or a feature map) -> one vector per sample.

Poolers (`TowerConfig.pooling`):

- `cls`: the first token, `last_hidden_state[:, 0]`.
- `mean`: text: the mean over the tokens the attention mask keeps; images: the mean over all
  tokens (CLS included), or over H and W for a 4D conv feature map [B, C, H, W].
- `pooler_output`: the model's own pooled output (flattened, so ResNet's [B, C, 1, 1] works).
- `eos`: the last token the attention mask keeps in each row (CLIP-text style, where the
  final EOS token has attended to the whole caption). It is found from the mask alone, so it
  is right for right padding (what `tokenize` produces) and for left padding alike.
- `embeds`: `image_embeds` / `text_embeds` of the `*WithProjection` classes.

`auto` resolves as follows (first matching row). The rule: wherever `transformers` has a pooled
output that the export reproduces exactly (`mmcl export`: `CLIPModel`, `SiglipModel` or
`VisionTextDualEncoderModel`, whose `get_*_features` read the tower's `pooler_output`), `auto`
picks it, so a model trained with the defaults works for whoever downloads it with plain
`transformers`. The last column says whether the export is exact with the `auto` choice.

| kind  | tower                                   | pooler          | why                                         | exact |
|-------|-----------------------------------------|-----------------|---------------------------------------------|-------|
| both  | class name ends in `WithProjection`     | `embeds`        | the user asked for the projected space      | no: transformers rebuilds the base class |
| image | clip_vision_model, siglip_vision_model, siglip2_vision_model | `pooler_output` | CLS + post-norm (CLIP), MAP head (SigLIP, SigLIP 2; over the real patches only with NaFlex) | yes |
| image | convnext, convnextv2                    | `pooler_output` | global average + final layer norm           | yes |
| image | vit, deit                               | `cls`           | the export sets ViT's pooler to the identity (`pooler_act: linear`), so pooler_output is the class token | yes |
| image | dinov2                                  | `cls`           | Dinov2's pooler_output is the (normed) class token | yes |
| image | anything else                           | 4D map -> `mean`; else `pooler_output` if the model returns one; else `cls` (decided on the first forward) | | measured at export |
| text  | clip_text_model                         | `eos`           | what CLIP's pooler_output computes, but from the mask; the export aligns `eos_token_id` with the tokenizer | yes |
| text  | siglip_text_model, siglip2_text_model   | `pooler_output` | SigLIP's head on the last token             | yes |
| text  | bert, roberta, xlm-roberta              | `pooler_output` | the class token through the pooler's dense + tanh layer, which is what transformers returns (trained from scratch it is one more layer; see benchmarks/RESULTS.md, "Text pooling", for `cls` and `mean` measured against it) | yes |
| text  | distilbert, electra, deberta, deberta-v2 | `cls`          | these models have no pooler in transformers | no  |
| text  | t5, mt5, umt5                           | `mean`          | no CLS token and no pooler; sentence-T5 style | no  |
| text  | anything else                           | `pooler_output` if the model returns one, else `mean` (decided on the first forward) | | measured at export |
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import PreTrainedModel

POOLINGS = ("cls", "mean", "pooler_output", "eos", "embeds")

AUTO_POOLING: dict[str, dict[str, str]] = {
    "image": {
        "clip_vision_model": "pooler_output",
        "siglip_vision_model": "pooler_output",
        "siglip2_vision_model": "pooler_output",
        "convnext": "pooler_output",
        "convnextv2": "pooler_output",
        "vit": "cls",
        "deit": "cls",
        "dinov2": "cls",
    },
    "text": {
        "clip_text_model": "eos",
        "siglip_text_model": "pooler_output",
        "siglip2_text_model": "pooler_output",
        "bert": "pooler_output",
        "roberta": "pooler_output",
        "xlm-roberta": "pooler_output",
        "distilbert": "cls",
        "electra": "cls",
        "deberta": "cls",
        "deberta-v2": "cls",
        "t5": "mean",
        "mt5": "mean",
        "umt5": "mean",
    },
}


def resolve_pooling(tower: PreTrainedModel, kind: Literal["image", "text"], pooling: str = "auto") -> str:
    """The pooler for `tower`: `pooling` itself unless it is `auto` (see the table above).

    Returns one of `POOLINGS`, or `auto` for an image tower of an unknown type, whose pooler
    is then picked from the outputs (feature map / pooler_output / first token).
    """
    if pooling != "auto":
        if pooling not in POOLINGS:
            raise ValueError(f"pooling '{pooling}' is unknown; use one of auto, {', '.join(POOLINGS)}.")
        if pooling == "embeds" and not type(tower).__name__.endswith("WithProjection"):
            raise ValueError(
                f"pooling 'embeds' needs a *WithProjection tower class, not {type(tower).__name__}; set model_class "
                "(e.g. CLIPVisionModelWithProjection) or pick another pooling."
            )
        return pooling
    if type(tower).__name__.endswith("WithProjection"):
        return "embeds"
    if tower.config.model_type in AUTO_POOLING[kind]:
        return AUTO_POOLING[kind][tower.config.model_type]
    if kind == "text":  # a text model with a pooler returns pooler_output, which the export reproduces
        return "pooler_output" if getattr(tower, "pooler", None) is not None else "mean"
    return "auto"


def pooled_width(tower: PreTrainedModel, pooling: str) -> int:
    """Width of the pooled vector: `projection_dim` for `embeds`, else the tower's hidden
    size (`hidden_size`, or `hidden_sizes[-1]` for ConvNeXt/ResNet-style conv towers)."""
    config = tower.config
    if pooling == "embeds":
        width = getattr(config, "projection_dim", None)
    elif pooling == "pooler_output" and isinstance(getattr(config, "projection_size", None), int):
        width = config.projection_size  # SigLIP's text head maps hidden_size -> projection_size
    else:
        width = getattr(config, "hidden_size", None)
        if width is None and getattr(config, "hidden_sizes", None):
            width = config.hidden_sizes[-1]
    if not isinstance(width, int):
        raise ValueError(
            f"cannot tell the output width of {type(tower).__name__} with pooling '{pooling}' from its config "
            "(no hidden_size, hidden_sizes or projection_dim)."
        )
    return width


def pool(outputs: Any, pooling: str, kind: Literal["image", "text"], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a tower's outputs into [B, D].

    `outputs` is a transformers `ModelOutput`: `last_hidden_state` is [B, L, D] (tokens) or
    [B, C, H, W] (conv map). `attention_mask` [B, L] (1 = token, 0 = padding) is required by
    `eos` and used by `mean` for text.
    """
    if pooling == "embeds":
        pooled = getattr(outputs, f"{kind}_embeds", None)
        if pooled is None:
            raise ValueError(f"pooling 'embeds' needs a tower that returns {kind}_embeds (a *WithProjection class).")
        return pooled
    if pooling == "pooler_output":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError("pooling 'pooler_output' needs a tower that returns pooler_output; use cls, mean or eos.")
        return pooled.flatten(1)

    hidden = outputs.last_hidden_state
    if pooling == "auto":  # image tower of an unknown type, see the module table
        if hidden.ndim == 4:
            pooling = "mean"
        elif getattr(outputs, "pooler_output", None) is not None:
            return outputs.pooler_output.flatten(1)
        else:
            pooling = "cls"
    if hidden.ndim == 4:
        if pooling != "mean":
            raise ValueError(f"pooling '{pooling}' needs token outputs, but the tower returns a 4D feature map; use mean.")
        return hidden.mean(dim=(2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if pooling == "eos":
        if attention_mask is None:
            raise ValueError("pooling 'eos' needs an attention mask (a text tower).")
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
        last = (attention_mask.to(positions.dtype) * positions).argmax(dim=1)  # last position with mask 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling '{pooling}' is unknown; use one of auto, {', '.join(POOLINGS)}.")
