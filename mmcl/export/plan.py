"""What plain `transformers` will reproduce of a model, known from its towers before training.

`mmcl export` measures exactness on probe inputs (mmcl/export/convert.py); this module
predicts the same answer from the tower classes, poolings and heads alone, so a run can say
at start-up that its Hub model will need the mmcl loader, and what to change instead:

    plans = plan_export(model)                     # {"image": SidePlan, "text": SidePlan}
    for line in export_warnings(model, context_length): print(line)

Prediction and measurement are pinned against each other in tests/export/test_export_plan.py.
A tower outside the families below gets `exact=None`: the export measures it.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# transformers' zero-shot pipeline pads SigLIP prompts to this many tokens (pipelines/zero_shot_image_classification.py).
SIGLIP_PIPELINE_LENGTH = 64
SIGLIP_MODELS = ("SiglipModel", "Siglip2Model")  # two-tower classes whose heads live in their towers
_KNOWN = {
    "image": {"vit", "deit", "dinov2", "clip_vision_model", "siglip_vision_model", "convnext", "convnextv2"},
    "text": {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "clip_text_model",
             "siglip_text_model", "t5", "mt5", "umt5"},
}
_NO_POOLER = "{model_type} has no pooled output in transformers, so no pooling of it is exact; choose a text tower " \
             "with one (bert, roberta, clip_text_model, siglip_text_model) or load the export with mmcl"


@dataclass
class SidePlan:
    """One side of the export: exact (True/False, None = measured at export), why not, what would be."""

    kind: str
    exact: bool | None
    reason: str | None = None
    alternative: str | None = None


def projection_kind(head: nn.Module) -> str:
    if isinstance(head, nn.Identity):
        return "none"
    if isinstance(head, nn.Linear) and head.bias is None:
        return "linear"
    return "mlp"


def target_architecture(model) -> str:
    """The transformers class the export writes: CLIPModel, SiglipModel, Siglip2Model,
    VisionTextDualEncoderModel or image_tower."""
    from transformers import (CLIPTextModel, CLIPVisionModel, Siglip2TextModel, Siglip2VisionModel, SiglipTextModel,
                              SiglipVisionModel)

    image, text = type(model.image_tower), type(model.text_tower)
    if model.text_tower is None:
        return "image_tower"
    if image is CLIPVisionModel and text is CLIPTextModel:
        return "CLIPModel"
    if image is SiglipVisionModel and text is SiglipTextModel and all(
            isinstance(head, nn.Identity) for head in (model.image_projection, model.text_projection)):
        return "SiglipModel"
    if image is Siglip2VisionModel and text is Siglip2TextModel and all(
            isinstance(head, nn.Identity) for head in (model.image_projection, model.text_projection)):
        return "Siglip2Model"
    return "VisionTextDualEncoderModel"


def plan_export(model) -> dict[str, SidePlan]:
    """{"image": SidePlan[, "text": SidePlan]} for a DualEncoder, without running it."""
    architecture = target_architecture(model)
    plans = {}
    for kind in ("image", "text"):
        tower = getattr(model, f"{kind}_tower")
        if tower is None:
            continue
        projection = "linear" if architecture == "image_tower" else projection_kind(getattr(model, f"{kind}_projection"))
        pooling = getattr(model, f"{kind}_pooling")
        plans[kind] = _plan_side(kind, tower, pooling, projection, architecture)
    return plans


def _plan_side(kind: str, tower: nn.Module, pooling: str, projection: str, architecture: str) -> SidePlan:
    from mmcl.export.hf_loader import rebuilt_class

    key = f"model.{kind}"
    model_type = tower.config.model_type
    name = type(tower).__name__
    if name.endswith("WithProjection"):
        return SidePlan(kind, False, f"transformers rebuilds {name} as its base class without the projection",
                        f"leave {key}.model_class unset and use {key}.projection: linear")
    rebuilt = rebuilt_class(tower.config, kind)
    if rebuilt is not type(tower) and architecture not in SIGLIP_MODELS:  # SiglipModel builds its towers itself
        built = rebuilt.__name__ if rebuilt else "no known class"
        return SidePlan(kind, False, f"transformers rebuilds this tower as {built}, but mmcl trained {name}",
                        _NO_POOLER.format(model_type=model_type) if kind == "text" else None)
    if projection == "mlp":
        return SidePlan(kind, False, "the mlp projection head does not fit the single bias-free Linear of transformers' "
                                     "dual encoders", f"{key}.projection: linear")
    if architecture in SIGLIP_MODELS and pooling != "pooler_output":
        return SidePlan(kind, False, f"{architecture} returns the {kind} tower's pooler_output, not '{pooling}' pooling",
                        f"{key}.pooling: pooler_output")
    if pooling == "pooler_output":
        return SidePlan(kind, True)
    if model_type not in _KNOWN[kind] or pooling == "auto":
        return SidePlan(kind, None)
    exact_pooling = {"vit": "cls", "deit": "cls", "dinov2": "cls", "clip_text_model": "eos"}.get(model_type)
    if pooling == exact_pooling:
        return SidePlan(kind, True)
    if exact_pooling is None and not _has_pooled_output(tower):
        return SidePlan(kind, False, _reason(kind, tower, pooling), None if kind == "image" else _NO_POOLER.format(model_type=model_type))
    return SidePlan(kind, False, _reason(kind, tower, pooling), f"{key}.pooling: {exact_pooling or 'pooler_output'}")


def _has_pooled_output(tower: nn.Module) -> bool:
    """BERT/RoBERTa/ViT/ConvNeXt keep a `pooler`; CLIP and SigLIP towers pool inside their transformer."""
    return getattr(tower, "pooler", None) is not None or tower.config.model_type in (
        "clip_vision_model", "siglip_vision_model", "clip_text_model", "siglip_text_model", "dinov2")


def _reason(kind: str, tower: nn.Module, pooling: str) -> str:
    name = type(tower).__name__
    if pooling == "mean":
        what = "the tokens kept by the attention mask" if kind == "text" else "all tokens"
        return f"mmcl averages {what}, while transformers uses {name}'s pooler_output"
    if pooling == "cls" and tower.config.model_type == "clip_vision_model":
        return "mmcl pools the class token before CLIP's post-layernorm, transformers' pooler_output after it"
    if pooling == "cls":
        # BERT-style poolers hard-wire tanh; ViT-style ones read `pooler_act` (and the export resets it).
        pooler = getattr(tower, "pooler", None)
        tanh = isinstance(getattr(pooler, "activation", None), nn.Tanh) and not hasattr(tower.config, "pooler_act")
        how = "adds a dense layer with a hard-wired tanh" if tanh else "is computed differently"
        return f"mmcl pools the first token's last hidden state, while {name}'s pooler_output {how}"
    return f"mmcl's '{pooling}' pooling is not what {name}'s pooler_output computes"


def export_warnings(model, context_length: int | None = None) -> list[str]:
    """One line per side that will not export exactly to plain transformers (the side, why, the exact
    alternative), plus one for a SigLIP model whose prompts the zero-shot pipeline would pad differently."""
    lines = []
    for plan in inexact_sides(plan_export(model)):
        instead = f"; exact instead: {plan.alternative}" if plan.alternative else ""
        lines.append(f"the {plan.kind} side will not export exactly to plain transformers ({plan.reason}){instead}; "
                     "the Hub model will need mmcl's loader for it")
    if target_architecture(model) in SIGLIP_MODELS and context_length not in (None, SIGLIP_PIPELINE_LENGTH):
        lines.append(f"transformers' zero-shot pipeline pads SigLIP prompts to {SIGLIP_PIPELINE_LENGTH} tokens and SigLIP "
                     f"pools the last position, but model.text.context_length is {context_length}; set it to "
                     f"{SIGLIP_PIPELINE_LENGTH} so pipeline(\"zero-shot-image-classification\") scores like mmcl")
    return lines


def inexact_sides(plans: dict[str, SidePlan]) -> list[SidePlan]:
    """The sides predicted not to be exact (unknown ones are measured at export, not counted here)."""
    return [plan for plan in plans.values() if plan.exact is False]
