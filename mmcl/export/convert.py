"""DualEncoder -> a `transformers` model, and an honest account of what that model reproduces.

Image-text models become a `VisionTextDualEncoderModel`, a `CLIPModel` when both towers are
CLIP towers with linear or no heads, or a `SiglipModel` when both are SigLIP towers without
mmcl heads (SigLIP's text tower ends in its own head; a `Siglip2Model` for SigLIP 2 towers), with the learnt logit scale and bias. Its `get_image_features` / `get_text_features`
run the tower, take the tower's `pooler_output` and apply one bias-free Linear. mmcl's own
encoders run the tower, apply the configured pooling, then the projection head. The two
agree exactly only when the pooling *is* the pooler_output and the head is linear (or none,
stored as an identity matrix). Where mmcl can make them agree without changing the
embeddings, it does:

- ViT/DeiT with `cls` pooling: the pooler's activation is configurable (`pooler_act`), so
  the export sets it to `linear` and the pooler's dense layer to the identity; pooler_output
  is then exactly the class token. (BERT's pooler hard-wires tanh; that cannot be undone.)
- CLIP text with `eos` pooling: CLIP's pooler picks the first `eos_token_id` of each row;
  the export sets that id to the tokenizer's EOS, which the tokenizer appends last.
- towers without `hidden_size` (ConvNeXt): it is set to the pooled width, which
  VisionTextDualEncoderModel sizes its projection from.

Whether a side is exact is then *measured*, not assumed: both models encode probe inputs
and the side is exact when they agree to 1e-5 (relative to the features' scale). A side that
is not exact gets a NaN projection in the transformers model, so `get_*_features` cannot
silently return different embeddings; `mmcl.export.load_exported` reproduces it from the
tower weights, the recorded pooling and the head in `mmcl_heads.safetensors`.

Image-only (SSL) models export the image tower alone (`AutoModel`); the head goes to
`mmcl_heads.safetensors`, and "exact" then means pooler_output equals mmcl's pooled features.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mmcl.export.hf_loader import rebuilt_class
from mmcl.export.plan import SIGLIP_MODELS, plan_export, projection_kind, target_architecture

TOLERANCE = 1e-5
PROBE_TEXTS = (
    "a photo of a cat.",
    "handwritten 7",
    "a long caption " + " ".join(["that keeps going"] * 40) + " until it is truncated",
)


@dataclass
class SideReport:
    """How one tower is exported and whether plain transformers reproduces it."""

    tower_class: str  # the class mmcl trained (and the loader rebuilds)
    model_type: str
    pooling: str  # mmcl's pooling, made concrete ("auto" resolved)
    projection: str  # linear / mlp / none
    features: str = "embeddings"  # what `exact` is about: "embeddings", or "pooled" for image-only exports
    exact: bool = False  # plain transformers reproduces `features` (measured)
    max_diff: float | None = None  # measured relative max abs difference on the probes
    adjustments: list[str] = field(default_factory=list)  # what the export changed to make it exact
    reason: str | None = None  # why it is not exact

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- probes


IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def image_inputs(probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's inputs among `probes`: pixel_values (and NaFlex's mask and spatial shapes)."""
    return {key: probes[key] for key in IMAGE_KEYS if key in probes}


def probe_inputs(config, tokenizer) -> dict[str, torch.Tensor]:
    """Fixed random pixels [2, 3, S, S] (NaFlex, `data.naflex`: a wide and a tall random image as
    padded patches with their mask and spatial shapes) and tokenized probe captions [3, L]."""
    from mmcl.models import tokenize

    generator = torch.Generator().manual_seed(0)
    size = config.data.image_size
    naflex = getattr(config.data, "naflex", None)
    if naflex is not None:
        from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch
        from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

        transform = NaFlexPatchesU8(naflex.patch_size, naflex.max_num_patches)
        images = [torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8) for shape in ((3, 37, 90), (3, 64, 29))]
        probes = naflex_batch([transform(image) for image in images], config.data.image_mean or CLIP_MEAN,
                              config.data.image_std or CLIP_STD)
    else:
        probes = {"pixel_values": torch.randn(2, 3, size, size, generator=generator)}
    if tokenizer is not None and config.model.text is not None:
        probes.update(tokenize(tokenizer, list(PROBE_TEXTS), config.model.text.context_length))
    return probes


def relative_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| / max(1, max |a|): absolute for unit-scale features, relative for large ones."""
    reference, other = reference.detach().float(), other.detach().float()
    if reference.shape != other.shape:
        return math.inf
    return ((reference - other).abs().max() / reference.abs().max().clamp(min=1.0)).item()


def concrete_pooling(model, pixel_values: torch.Tensor) -> str:
    """The image pooling, with `auto` (decided per forward for unknown towers) made explicit."""
    if model.image_pooling != "auto":
        return model.image_pooling
    with torch.no_grad():
        outputs = model.image_tower(pixel_values=pixel_values[:1])
    if outputs.last_hidden_state.ndim == 4:
        return "mean"
    return "pooler_output" if getattr(outputs, "pooler_output", None) is not None else "cls"


# ----------------------------------------------------------------------------- adjustments


def adapt_image_tower(tower: nn.Module, pooling: str) -> list[str]:
    """Make pooler_output equal mmcl's pooling where the tower's config allows it (in place)."""
    from transformers.activations import ACT2FN

    pooler = getattr(tower, "pooler", None)
    dense = getattr(pooler, "dense", None)
    if pooling == "cls" and hasattr(tower.config, "pooler_act") and isinstance(dense, nn.Linear) \
            and dense.in_features == dense.out_features:
        tower.config.pooler_act = "linear"
        pooler.activation = ACT2FN["linear"]
        with torch.no_grad():
            dense.weight.copy_(torch.eye(dense.in_features))
            if dense.bias is not None:
                dense.bias.zero_()
        return ["the pooler is set to the identity (pooler_act linear, dense weight I, bias 0), so pooler_output is the class token"]
    return []


def adapt_text_tower(tower: nn.Module, pooling: str, tokenizer) -> list[str]:
    """CLIP text: let pooler_output pick the tokenizer's EOS, which is mmcl's `eos` token (in place)."""
    notes = []
    if tower.config.model_type != "clip_text_model" or tokenizer is None:
        return notes
    eos = getattr(tokenizer, "eos_token_id", None)
    if pooling == "eos" and eos is not None and tower.config.eos_token_id != eos:
        tower.config.eos_token_id = eos
        for module in tower.modules():  # the pooler reads a copy taken at init (the tower itself in transformers 5)
            if isinstance(getattr(module, "eos_token_id", None), int):
                module.eos_token_id = eos
        notes.append(f"eos_token_id is set to the tokenizer's EOS id {eos}, so pooler_output is the last kept token")
    # CLIP's default special ids (49406, 49407) lie outside a smaller vocabulary, which transformers warns
    # about on every load; they only matter to the eos pooler handled above, so they follow the tokenizer.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value, wanted = getattr(tower.config, name, None), getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= tower.config.vocab_size and wanted is not None:
            setattr(tower.config, name, wanted)
    return notes


def _ensure_hidden_size(config, width: int) -> list[str]:
    if isinstance(getattr(config, "hidden_size", None), int):
        return []
    config.hidden_size = width  # VisionTextDualEncoderModel sizes its projection from hidden_size
    return [f"hidden_size is set to the pooled width {width} for VisionTextDualEncoderModel"]


def _poison(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.fill_(float("nan"))


def _fill_projection(target: nn.Linear, head: nn.Module, kind: str) -> bool:
    """Copy mmcl's head into the bias-free Linear `target`; False when it does not fit."""
    with torch.no_grad():
        if kind == "linear" and head.weight.shape == target.weight.shape:
            target.weight.copy_(head.weight)
            return True
        if kind == "none" and target.in_features == target.out_features:
            target.weight.copy_(torch.eye(target.in_features))  # exact: x @ I adds only zeros
            return True
    _poison(target)
    return False


# ----------------------------------------------------------------------------- conversion


def convert(model, config, tokenizer) -> tuple[nn.Module, dict[str, SideReport], dict[str, torch.Tensor]]:
    """(transformers model in eval mode, {"image"/"text": SideReport}, probes) for a DualEncoder in eval mode."""
    probes = probe_inputs(config, tokenizer)
    if model.text_tower is None:
        hf, reports = _image_only(model, probes)
    else:
        hf, reports = _dual(model, config, tokenizer, probes)
    return hf.eval(), reports, probes


def _image_only(model, probes) -> tuple[nn.Module, dict[str, SideReport]]:
    from mmcl.models import pool

    pixels = probes["pixel_values"]
    pooling = concrete_pooling(model, pixels)
    tower = copy.deepcopy(model.image_tower).float().eval()
    report = SideReport(type(tower).__name__, tower.config.model_type, pooling, projection_kind(model.image_projection),
                        features="pooled")
    report.adjustments += adapt_image_tower(tower, pooling)
    with torch.no_grad():
        reference = pool(model.image_tower(pixel_values=pixels), pooling, "image")
        pooled = getattr(tower(pixel_values=pixels), "pooler_output", None)
    report.max_diff = relative_diff(reference, pooled.flatten(1)) if pooled is not None else math.inf
    # AutoModel must rebuild the very class that was measured (a *WithProjection tower would lose its head).
    report.exact = rebuilt_class(tower.config, "image") is type(tower) and report.max_diff <= TOLERANCE
    if not report.exact:
        report.reason = plan_export(model)["image"].reason \
            or f"the tower's pooler_output differs from mmcl's pooled features by {report.max_diff:.1e}"
    return tower, {"image": report}


def _dual(model, config, tokenizer, probes) -> tuple[nn.Module, dict[str, SideReport]]:
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    from mmcl.models import pooled_width

    vision = copy.deepcopy(model.image_tower).float().eval()
    text = copy.deepcopy(model.text_tower).float().eval()
    image_pooling = concrete_pooling(model, probes["pixel_values"])
    reports = {
        "image": SideReport(type(vision).__name__, vision.config.model_type, image_pooling, projection_kind(model.image_projection)),
        "text": SideReport(type(text).__name__, text.config.model_type, model.text_pooling, projection_kind(model.text_projection)),
    }
    reasons = {kind: plan.reason for kind, plan in plan_export(model).items()}  # why a side should differ, by the rules
    reports["image"].adjustments += adapt_image_tower(vision, image_pooling)
    reports["text"].adjustments += adapt_text_tower(text, model.text_pooling, tokenizer)
    reports["image"].adjustments += _ensure_hidden_size(vision.config, pooled_width(model.image_tower, image_pooling))

    scale_log = min(model.logit_scale.item(), model.logit_scale_max_log)  # mmcl clamps in the forward pass
    architecture = target_architecture(model)
    if architecture in SIGLIP_MODELS and image_pooling == model.text_pooling == "pooler_output":
        hf = _as_siglip_model(vision, text, scale_log, model.logit_bias, architecture)
        fitted, reasons = {"image": True, "text": True}, {"image": None, "text": None}  # SiglipModel builds both towers
        _measure(model, hf.eval(), probes, reports, reasons, fitted)
        return hf, reports
    hf_config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=config.model.embed_dim, logit_scale_init_value=scale_log)
    hf = VisionTextDualEncoderModel(hf_config, vision_model=vision, text_model=text)
    with torch.no_grad():
        hf.logit_scale.fill_(scale_log)
    fitted = {
        "image": _fill_projection(hf.visual_projection, model.image_projection, reports["image"].projection),
        "text": _fill_projection(hf.text_projection, model.text_projection, reports["text"].projection),
    }
    hf = _as_clip_model(hf) or hf
    _measure(model, hf.eval(), probes, reports, reasons, fitted)
    return hf, reports


def _as_siglip_model(vision, text, scale_log: float, bias, architecture: str = "SiglipModel") -> nn.Module:
    """A SiglipModel (or Siglip2Model) holding the two towers, with mmcl's logit scale (a log, clamped) and bias."""
    import transformers

    cls = getattr(transformers, architecture)
    config = cls.config_class(text_config=text.config.to_dict(), vision_config=vision.config.to_dict())
    siglip = cls(config)
    siglip.vision_model.load_state_dict(vision.state_dict(), strict=True)
    siglip.text_model.load_state_dict(text.state_dict(), strict=True)
    with torch.no_grad():
        siglip.logit_scale.fill_(scale_log)
        siglip.logit_bias.fill_(0.0 if bias is None else float(bias.detach()))
    return siglip


def _as_clip_model(hf) -> nn.Module | None:
    """The same weights as a CLIPModel, when both towers are plain CLIP towers."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel

    if type(hf.vision_model) is not CLIPVisionModel or type(hf.text_model) is not CLIPTextModel:
        return None
    config = CLIPConfig(
        text_config=hf.config.text_config.to_dict(), vision_config=hf.config.vision_config.to_dict(),
        projection_dim=hf.config.projection_dim, logit_scale_init_value=hf.config.logit_scale_init_value)
    clip = CLIPModel(config)
    clip.load_state_dict(hf.state_dict(), strict=True)
    return clip


def _measure(model, hf, probes, reports, reasons, fitted) -> None:
    """Encode the probes with both models; mark each side exact, or poison its projection."""
    images, ids, mask = image_inputs(probes), probes["input_ids"], probes["attention_mask"]
    sides = {  # SiglipModel has no projections to poison: it is only built when both sides should be exact
        "image": (lambda: model.encode_image(**images, normalize=False),
                  lambda: hf.get_image_features(**images).pooler_output, getattr(hf, "visual_projection", None)),
        "text": (lambda: model.encode_text(ids, mask, normalize=False),
                 lambda: hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, getattr(hf, "text_projection", None)),
    }
    for kind, (ours, theirs, head) in sides.items():
        report = reports[kind]
        if fitted[kind] and "rebuilds" not in (reasons[kind] or ""):  # a rebuilt class is never exact
            try:
                with torch.no_grad():
                    report.max_diff = relative_diff(ours(), theirs())
            except Exception as error:  # a tower whose outputs do not fit the transformers class
                reasons[kind] = reasons[kind] or f"transformers cannot encode with this tower ({type(error).__name__})"
        report.exact = report.max_diff is not None and report.max_diff <= TOLERANCE
        if not report.exact:
            report.reason = reasons[kind] or f"transformers' features differ from mmcl's by {report.max_diff:.1e} on probe inputs"
            if head is None:
                from mmcl.export.errors import ExportError

                raise ExportError(f"the SiglipModel export does not reproduce the {kind} side ({report.reason}); "
                                  "this is a bug in mmcl's export, please report it.")
            _poison(head)
