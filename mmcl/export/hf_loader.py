"""Load an mmcl export with `transformers` and reproduce mmcl's embeddings exactly.

    from mmcl.export import load_exported
    model = load_exported("path/to/export")          # or a Hub repo id
    image_features = model.encode_image(model.preprocess(images))        # [B, D], unit rows
    text_features = model.encode_text(**model.tokenize(["a photo of a cat"]))

The transformers model (`AutoModel`) supplies the towers; the loader then applies the pooling
recorded in `mmcl_export.json` and the projection heads in `mmcl_heads.safetensors`, which is
what mmcl's DualEncoder computes. This is needed for the sides the export marks as not exact
(their transformers projection is NaN on purpose) and gives the same numbers for the exact ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.export.errors import ExportError
from mmcl.model_dir import EXPORT_HEADS_FILE as HEADS_FILE
from mmcl.model_dir import EXPORT_INFO_FILE as INFO_FILE


class ExportedModel:
    """An export loaded with transformers; encodes like the mmcl model it came from."""

    def __init__(self, model: nn.Module, info: dict[str, Any], heads: dict[str, nn.Module], tokenizer: Any,
                 scalars: dict[str, torch.Tensor], device: torch.device):
        self.model = model  # the transformers model (VisionTextDualEncoderModel / CLIPModel / image tower)
        self.info = info  # mmcl_export.json
        self.heads = heads  # {"image": head, "text": head}
        self.tokenizer = tokenizer
        self.device = device
        self.logit_scale = float(scalars["logit_scale"].exp().clamp(max=info["logit_scale_max"]))  # as mmcl clamps it
        self.logit_bias = float(scalars["logit_bias"]) if "logit_bias" in scalars else None

    @property
    def image_tower(self) -> nn.Module:
        return self.model if self.info["architecture"] == "image_tower" else self.model.vision_model

    @property
    def text_tower(self) -> nn.Module | None:
        return None if self.info["architecture"] == "image_tower" else self.model.text_model

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> pixel_values [B, 3, S, S]: mmcl's evaluation transform (torchvision)."""
        from mmcl.data.transforms import CLIP_MEAN, CLIP_STD, torchvision_eval_transform

        spec = self.info["image_transform"]
        if "naflex" in spec:
            raise ExportError("this export takes NaFlex patches; make its inputs with transformers' "
                              "AutoProcessor.from_pretrained(folder)(images=...) and pass them to encode_image.")
        transform = torchvision_eval_transform(spec["image_size"], spec["mean"] or CLIP_MEAN, spec["std"] or CLIP_STD)
        return torch.stack([transform(image.convert("RGB")) for image in images])

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """texts -> input_ids, attention_mask [B, context_length], padded and truncated as in training."""
        from mmcl.models import tokenize

        if self.tokenizer is None:
            raise ValueError("this export has no text tower.")
        return tokenize(self.tokenizer, texts, self.info["text_inputs"]["context_length"])

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True,
                     pixel_attention_mask: torch.Tensor | None = None,
                     spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> image embeddings [B, D]; NaFlex exports (SigLIP 2) take
        pixel_values [B, L, 3*P*P] with pixel_attention_mask [B, L] and spatial_shapes [B, 2]."""
        from mmcl.models import pool

        if spatial_shapes is None:
            outputs = self.image_tower(pixel_values=pixel_values.to(self.device))
        else:
            outputs = self.image_tower(pixel_values=pixel_values.to(self.device), spatial_shapes=spatial_shapes.to(self.device),
                                       pixel_attention_mask=pixel_attention_mask.to(self.device))
        features = self.heads["image"](pool(outputs, self.info["image"]["pooling"], "image"))
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """input_ids, attention_mask [B, L] -> text embeddings [B, D] (no mask = no padding)."""
        from mmcl.models import pool

        if self.text_tower is None:
            raise ValueError("this export has no text tower.")
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        outputs = self.text_tower(input_ids=input_ids, attention_mask=attention_mask)
        features = self.heads["text"](pool(outputs, self.info["text"]["pooling"], "text", attention_mask))
        return F.normalize(features, dim=-1) if normalize else features


def read_info(folder: Path) -> dict[str, Any]:
    path = folder / INFO_FILE
    if not path.is_file():
        raise ExportError(f"{folder} has no {INFO_FILE}; it was not written by `mmcl export`.")
    return json.loads(path.read_text())


def build_head(prefix: str, kind: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The projection head `kind` with the weights under `prefix.` in `state` (shapes decide the sizes)."""
    weights = {name[len(prefix) + 1:]: tensor for name, tensor in state.items() if name.startswith(prefix + ".")}
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        out_dim, in_dim = weights["weight"].shape
        head = nn.Linear(in_dim, out_dim, bias=False)
    elif kind == "mlp":
        hidden, in_dim = weights["0.weight"].shape
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, weights["2.weight"].shape[0]))
    else:
        raise ExportError(f"{INFO_FILE} names an unknown projection '{kind}'; upgrade mmcl.")
    head.load_state_dict(weights, strict=True)
    return head


def rebuilt_class(config, kind: str) -> type | None:
    """The tower class VisionTextDualEncoderModel builds from `config` when it is loaded."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if kind == "image" and isinstance(config, CLIPVisionConfig):
        return CLIPVisionModel
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        return None


def _load_transformers_model(folder: Path, info: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel, VisionTextDualEncoderModel

    if info["architecture"] == "image_tower":
        return getattr(transformers, info["image"]["tower_class"]).from_pretrained(str(folder))
    if info["architecture"] != "VisionTextDualEncoderModel":
        return AutoModel.from_pretrained(str(folder))
    # Towers whose class differs from what VisionTextDualEncoderModel builds (e.g. T5EncoderModel,
    # SiglipTextModel) are built here, and the weights loaded by name into the assembled model
    # (from_pretrained would build on the meta device and leave such towers' buffers unset).
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(str(folder))
    towers = {}
    for kind, key, sub in (("image", "vision_model", config.vision_config), ("text", "text_model", config.text_config)):
        cls = getattr(transformers, info[kind]["tower_class"])
        if rebuilt_class(sub, kind) is not cls:
            towers[key] = cls(sub)
    if not towers:
        return VisionTextDualEncoderModel.from_pretrained(str(folder))
    model = VisionTextDualEncoderModel(config, **towers)
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    model.tie_weights()  # safetensors stores tied weights once (T5's encoder.embed_tokens is `shared`)
    pointers = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointers.setdefault(tensor.data_ptr(), []).append(name)
    untied = [name for name in missing if len(pointers[model.state_dict(keep_vars=True)[name].data_ptr()]) < 2]
    if unexpected or untied:
        raise ExportError(f"{folder / 'model.safetensors'} does not fit {config.text_config.model_type}/"
                          f"{config.vision_config.model_type} towers ({(unexpected or untied)[0]}); export the run again.")
    return model


def load_exported(path_or_repo_id: str | Path, device: torch.device | str = "cpu", revision: str | None = None) -> ExportedModel:
    """Load an export (a local folder or a Hub repo id) as an `ExportedModel` in eval mode on `device`."""
    from safetensors.torch import load_file

    folder = Path(path_or_repo_id).expanduser()
    if not folder.is_dir():
        if Path(path_or_repo_id).is_absolute() or str(path_or_repo_id).startswith((".", "~")):
            raise ExportError(f"export folder {path_or_repo_id} does not exist.")
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(path_or_repo_id), revision=revision))
    info = read_info(folder)
    if not (folder / HEADS_FILE).is_file():
        raise ExportError(f"{folder} has no {HEADS_FILE}; export the run again with `mmcl export`.")
    state = load_file(str(folder / HEADS_FILE))
    heads = {kind: build_head(f"{kind}_projection", info[kind]["projection"], state) for kind in ("image", "text") if kind in info}
    model = _load_transformers_model(folder, info)
    tokenizer = None
    if "text" in info:
        from transformers import AutoTokenizer

        from mmcl.models.tokenizer import padding_side

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.padding_side = padding_side(tokenizer, info["text"].get("model_type"))  # the side mmcl trained with
    device = torch.device(device)
    for head in heads.values():
        head.to(device).eval()
    scalars = {name: tensor for name, tensor in state.items() if name in ("logit_scale", "logit_bias")}
    return ExportedModel(model.to(device).eval(), info, heads, tokenizer, scalars, device)
