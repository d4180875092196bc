"""The frozen teacher of the `distill` objective, from any of the model kinds users have.

    teacher = load_teacher(cfg.distill)           # before any process group (errors are one sentence)
    teacher.encode_image(teacher_pixel_values)    # [B, 3, S_t, S_t] -> [B, D_t], unit rows, float32
    teacher.encode_text(input_ids, attention_mask)  # the teacher's own tokens [B, L_t] -> [B, D_t]
    teacher.logit_scale                           # its own (exponentiated) scale, a float

`distill.teacher` may be
- `openclip:<architecture>` with `distill.weights` (a local file; `distill.openclip_config`
  registers an architecture open_clip does not ship, its file stem being the name),
- `hf-hub:<org>/<name>`: an OpenCLIP model on the Hub (open_clip downloads it),
- a local directory: an mmcl export (`mmcl_export.json`; encoded exactly as mmcl did, through
  `mmcl.export.load_exported`), an mmcl model directory (`config.yaml` + `model.safetensors`),
  or a `transformers` CLIPModel / SiglipModel / Siglip2Model / VisionTextDualEncoderModel directory
  (a Siglip2Model gets its own NaFlex patches: `TeacherInputs.naflex`).

What the data pipeline needs to give the teacher its own inputs is `inputs()` (image size,
normalisation, tokenizer, context length). `sha256` fingerprints the weights (every tensor of
the state dict, by name, before any bf16 cast): resume refuses a teacher whose weights changed,
and the feature cache is keyed by it.

The teacher is a plain object, not an `nn.Module` attribute of anything DeepSpeed wraps: it is
never trained, cast, partitioned by ZeRO-3 or written into a checkpoint.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.model_dir import kind_of

if TYPE_CHECKING:
    from mmcl.objectives.settings import DistillConfig


class TeacherLoadError(ValueError):
    """The configured teacher cannot be loaded; the message is one sentence."""


@dataclass(frozen=True)
class TeacherInputs:
    """How the data pipeline prepares the teacher's inputs."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: Any  # a transformers tokenizer or an OpenCLIP tokenizer (see mmcl.data.tokenize)
    context_length: int
    naflex: tuple[int, int] | None = None  # SigLIP 2: (patch size, max patches) of its NaFlex inputs; image_size unused


def naflex_transform(inputs: TeacherInputs):
    """The teacher's NaFlex transform (`mmcl.data.naflex`), or None for a square-input teacher."""
    from mmcl.data.naflex import NaFlexPatchesU8

    return NaFlexPatchesU8(*inputs.naflex) if inputs.naflex is not None else None


class Teacher:
    """A frozen image-text model in eval mode: `encode_image`, `encode_text`, `logit_scale`, `inputs()`."""

    def __init__(self, module: nn.Module, encode_image: Callable[[Tensor], Tensor],
                 encode_text: Callable[[Tensor, Tensor], Tensor], logit_scale: float, inputs: TeacherInputs, name: str):
        self.module = module.eval().requires_grad_(False)
        self._encode_image, self._encode_text = encode_image, encode_text
        self.logit_scale = float(logit_scale)
        self._inputs = inputs
        self.name = name
        self.sha256 = weights_sha256(module)
        self.dtype = torch.float32

    def inputs(self) -> TeacherInputs:
        return self._inputs

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Teacher:
        self.module.to(device=device, dtype=dtype)
        if dtype is not None:
            self.dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None,
                     spatial_shapes: Tensor | None = None) -> Tensor:
        """[B, 3, S_t, S_t] (normalised for the teacher) -> [B, D_t] unit rows, float32. A NaFlex teacher
        (`inputs().naflex`) takes [B, L, 3*P*P] patches with pixel_attention_mask [B, L] and spatial_shapes [B, 2]."""
        if spatial_shapes is not None:
            features = self._encode_image(pixel_values.to(self.device, self.dtype),
                                          pixel_attention_mask.to(self.device), spatial_shapes.to(self.device))
        else:
            features = self._encode_image(pixel_values.to(self.device, self.dtype))
        return F.normalize(_tensor(features).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L_t] teacher tokens -> [B, D_t] unit rows, float32."""
        features = self._encode_text(input_ids.to(self.device), attention_mask.to(self.device))
        return F.normalize(_tensor(features).float(), dim=-1)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over every tensor of `module.state_dict()` (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _tensor(output: Any) -> Tensor:
    """transformers 5 returns model outputs from get_*_features (the projection in pooler_output)."""
    return output if torch.is_tensor(output) else output.pooler_output


def load_teacher(cfg: DistillConfig) -> Teacher:
    """The teacher named by `cfg.teacher` (see the module docstring), frozen, float32 or bf16, on the CPU."""
    if cfg.teacher is None:
        raise TeacherLoadError("the distill objective needs distill.teacher.")
    teacher = load_image_text_model(cfg.teacher, cfg.weights, cfg.openclip_config)
    if cfg.precision == "bf16":
        teacher.to(dtype=torch.bfloat16)
    return teacher


@dataclass(frozen=True)
class OptionNames:
    """How the user named the model, its weights and its OpenCLIP config (for error messages)."""

    model: str = "distill.teacher"
    weights: str = "distill.weights"
    openclip_config: str = "distill.openclip_config"


def load_image_text_model(spec: str, weights: str | None = None, openclip_config: str | None = None,
                          names: OptionNames = OptionNames()) -> Teacher:
    """Any image-text model `spec` names (the kinds of the module docstring), frozen, float32, on the CPU.

    Not tied to a config: `mmcl curate` loads the models it scores with through here; `names` are
    the option names its error messages use (TeacherLoadError, one sentence).
    """
    try:
        if spec.startswith("openclip:"):
            return _openclip_teacher(spec[len("openclip:"):], weights, openclip_config, names)
        if spec.startswith("hf-hub:"):
            return _openclip_teacher(spec, None, None, names)
        return _directory_teacher(Path(spec).expanduser(), names)
    except TeacherLoadError:
        raise
    except pickle.UnpicklingError:  # a legacy (non-zip) pickle that torch's weights-only load refuses
        raise TeacherLoadError(f"{names.model} '{spec}': its weights hold pickled objects, not only tensors, so they are "
                               "not loaded (unpickling them could run code); pass a .safetensors file or a state dict "
                               "of tensors.") from None
    except Exception as error:  # a loader failure deep inside open_clip / transformers: name the key
        raise TeacherLoadError(f"{names.model} '{spec}' could not be loaded ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}).") from error


# ----------------------------------------------------------------------------- OpenCLIP


def _openclip_teacher(model_name: str, weights: str | None, config_file: str | None, names: OptionNames) -> Teacher:
    import open_clip

    if config_file is not None:
        open_clip.add_model_config(config_file)
    hub = model_name.startswith("hf-hub:")
    if not hub and model_name not in open_clip.list_models():
        raise TeacherLoadError(f"open_clip has no architecture '{model_name}' ({names.model}); pick one of "
                               f"open_clip.list_models() or register yours with {names.openclip_config}.")
    if weights is not None:
        from mmcl.safe_unpickle import weights_file_problem

        problem = weights_file_problem(Path(weights))
        if problem is not None:
            raise TeacherLoadError(f"{names.weights} '{weights}' {problem}; pass a .safetensors file or a .pt/.bin "
                                   "holding only the state dict's tensors.")
    model = open_clip.create_model(model_name, pretrained=weights, require_pretrained=not hub)
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = preprocess.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(model_name)
    inputs = TeacherInputs(int(size), tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                           tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)), tokenizer,
                           int(getattr(tokenizer, "context_length", None) or model.context_length))
    return Teacher(model, model.encode_image, lambda ids, mask: model.encode_text(ids),
                   float(model.logit_scale.detach().exp()), inputs, model_name)


# ----------------------------------------------------------------------------- directories


def _directory_teacher(path: Path, names: OptionNames) -> Teacher:
    if not path.is_dir():
        raise TeacherLoadError(f"{names.model} '{path}' is not a directory.")
    kind = kind_of(path)
    if kind == "export":
        return _mmcl_export_teacher(path, names)
    if kind == "model_dir":
        return _mmcl_dir_teacher(path, names)
    if kind == "transformers":
        return _transformers_teacher(path, names)
    raise TeacherLoadError(f"{names.model} '{path}' is neither a transformers model directory (config.json), an mmcl "
                           "model directory (config.yaml + model.safetensors) nor an mmcl export.")


def _mmcl_dir_teacher(path: Path, names: OptionNames) -> Teacher:
    from mmcl.data.transforms import CLIP_MEAN, CLIP_STD
    from mmcl.model_dir import load_mmcl_model_dir

    model, config, tokenizer = load_mmcl_model_dir(path)
    if tokenizer is None:
        raise TeacherLoadError(f"{names.model} '{path}' has no text tower; both towers are needed.")
    data = config.data
    inputs = TeacherInputs(data.image_size, tuple(data.image_mean or CLIP_MEAN), tuple(data.image_std or CLIP_STD),
                           tokenizer, config.model.text.context_length)
    scale = float(model()["logit_scale"].detach())
    return Teacher(model, model.encode_image, model.encode_text, scale, inputs, str(path))


class _Holder(nn.Module):
    """The modules of an mmcl export (transformers model + heads), as one module for .to / state_dict."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)


def _mmcl_export_teacher(path: Path, names: OptionNames) -> Teacher:
    from mmcl.export.hf_loader import load_exported

    exported = load_exported(path)
    if exported.text_tower is None:
        raise TeacherLoadError(f"{names.model} '{path}' has no text tower; both towers are needed.")
    spec = exported.info["image_transform"]
    inputs = TeacherInputs(int(spec["image_size"]), tuple(spec["mean"]), tuple(spec["std"]), exported.tokenizer,
                           int(exported.info["text_inputs"]["context_length"]))
    holder = _Holder(exported.model, exported.heads)

    def encode_image(pixel_values: Tensor) -> Tensor:
        exported.device = pixel_values.device
        return exported.encode_image(pixel_values)

    def encode_text(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        exported.device = input_ids.device
        return exported.encode_text(input_ids, attention_mask)

    return Teacher(holder, encode_image, encode_text, exported.logit_scale, inputs, str(path))


def _side(size: Any) -> int | None:
    """An image processor's output side: an int, or a dict / SizeDict with height or shortest_edge."""
    if size is None or isinstance(size, int):
        return size
    for name in ("height", "shortest_edge"):
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        if value:
            return int(value)
    return None


def _transformers_teacher(path: Path, names: OptionNames) -> Teacher:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path))
    if config.model_type not in ("clip", "siglip", "siglip2", "vision-text-dual-encoder"):
        raise TeacherLoadError(f"{names.model} '{path}' is a transformers '{config.model_type}' model; it "
                               "must be a CLIP, SigLIP, SigLIP 2 or VisionTextDualEncoder model.")
    if config.model_type == "siglip2":
        return _siglip2_teacher(path, config)
    model = AutoModel.from_pretrained(str(path))
    processor = AutoImageProcessor.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "right"
    size = _side(getattr(processor, "crop_size", None)) or _side(processor.size)
    text_config = getattr(config, "text_config", None)
    context = getattr(text_config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 77)
    context = min(int(context), 512)
    siglip = config.model_type == "siglip"  # SigLIP's text tower is used unmasked at max_length (its training)
    inputs = TeacherInputs(int(size), tuple(processor.image_mean), tuple(processor.image_std), tokenizer, context)

    def encode_text(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if siglip:
            return model.get_text_features(input_ids=input_ids)
        return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)

    return Teacher(model, lambda pixels: model.get_image_features(pixel_values=pixels), encode_text,
                   float(model.logit_scale.detach().exp()), inputs, str(path))


def _siglip2_teacher(path: Path, config) -> Teacher:
    """A Siglip2Model folder: its image processor's NaFlex settings (patch size, max patches, mean/std), its
    tokenizer with its own (left) padding, and the text tower masked as its processor's outputs mask it."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path))
    processor = AutoImageProcessor.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    context = min(int(getattr(config.text_config, "max_position_embeddings", 64)), 512)
    inputs = TeacherInputs(0, tuple(processor.image_mean), tuple(processor.image_std), tokenizer, context,
                           naflex=(int(processor.patch_size), int(processor.max_num_patches)))

    def encode_image(pixels: Tensor, mask: Tensor, shapes: Tensor) -> Tensor:
        return model.get_image_features(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)

    return Teacher(model, encode_image, lambda ids, mask: model.get_text_features(input_ids=ids, attention_mask=mask),
                   float(model.logit_scale.detach().exp()), inputs, str(path))
