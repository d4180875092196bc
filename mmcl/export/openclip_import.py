"""OpenCLIP checkpoint -> a `transformers` CLIPModel folder that mmcl (and plain transformers) start from.

    mmcl convert openclip --model ViT-B-32 --weights open_clip_model.safetensors --out DIR
    mmcl convert openclip --model hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K --out DIR
    mmcl convert openclip --model local-dir:/path/to/openclip/folder --out DIR

writes
    DIR/config.json, model.safetensors        CLIPModel (towers + visual/text projections + logit scale)
    DIR/tokenizer.json, tokenizer_config.json  CLIPTokenizer over OpenCLIP's own BPE vocabulary
    DIR/preprocessor_config.json               CLIPImageProcessor set to OpenCLIP's eval preprocess
    DIR/processor_config.json                  CLIPProcessor (both of the above)
    DIR/openclip_conversion.json               source, measured differences to OpenCLIP

Covered: OpenCLIP's `CLIP` class with its own VisionTransformer (class-token pooling, pre and
post LayerNorm, linear projection) and its CLIP text transformer (causal, EOT pooling, linear
projection), GELU or QuickGELU: the standard ViT-* and ViT-*-quickgelu architectures and any
custom config of the same shape. Anything else (timm or ResNet towers, HF text encoders, CoCa,
SigLIP's logit bias, layer scale, attentional pooling, ...) is refused in one sentence, before
any weights are read.

Key mapping (OpenCLIP -> transformers, as in transformers' convert_clip_original_pytorch_to_hf):
conv1 -> embeddings.patch_embedding, class_embedding, positional_embedding ->
embeddings.position_embedding, ln_pre -> pre_layrnorm, resblocks.i.{ln_1, ln_2} ->
layers.i.{layer_norm1, layer_norm2}, attn.in_proj_{weight,bias} split in three ->
self_attn.{q,k,v}_proj, attn.out_proj -> self_attn.out_proj, mlp.{c_fc, c_proj} ->
mlp.{fc1, fc2}, ln_post -> post_layernorm, ln_final -> final_layer_norm, and the [width,
embed] matrices proj / text_projection -> the transposed Linear weights visual_projection /
text_projection.

The folder is written aside and moved into place only after the converted model reproduced
OpenCLIP's image and text embeddings on probe inputs (1e-5) and the tokenizer gave OpenCLIP's
ids on probe captions.
"""
from __future__ import annotations

import gzip
import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmcl.safe_unpickle import weights_file_problem
from mmcl.export.errors import ExportError
from mmcl.export.staging import check_convert_out, staged

TOLERANCE = 1e-5
REPORT_FILE = "openclip_conversion.json"
PROBE_CAPTIONS = (
    "a photo of a cat.",
    "A Photo of TWO   dogs,\tplaying in the snow!",
    "handwritten 7",
    "an image of the number 3 (three), written by hand; it's blurry",
    "a very long caption " + " ".join(f"with word {i}" for i in range(40)) + " that OpenCLIP truncates",
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Config values the converter reproduces; any other value of these keys is refused.
_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None, "block_type": None,
}
_TEXT_DEFAULTS = {
    "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None, "ls_init_value": None,
    "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "hf_model_name": None, "block_type": None,
}
_TOP_LEVEL_OK = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "cast_dtype", "init_logit_scale", "init_logit_bias",
                 "custom_text"}


# ----------------------------------------------------------------------------- what is supported


def check_supported(model_cfg: dict[str, Any], name: str) -> None:
    """Raise ExportError ("not supported: ...") unless `model_cfg` is a CLIP-ViT + CLIP-text architecture."""
    def refuse(what: str) -> None:
        raise ExportError(f"not supported: OpenCLIP model '{name}' {what}; mmcl converts OpenCLIP's standard "
                          "ViT-*/ViT-*-quickgelu CLIP architectures (its own vision and text transformers).")

    if "multimodal_cfg" in model_cfg:
        refuse("has a multimodal decoder (CoCa)")
    extra = sorted(set(model_cfg) - _TOP_LEVEL_OK)
    if extra:
        refuse(f"sets {', '.join(extra)}")
    if model_cfg.get("init_logit_bias") is not None:
        refuse("has a logit bias (SigLIP-style), which CLIPModel cannot hold")
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    if vision.get("timm_model_name"):
        refuse(f"uses a timm image tower ({vision['timm_model_name']})")
    if isinstance(vision.get("layers", 12), (list, tuple)):
        refuse("uses a ModifiedResNet image tower")
    if text.get("hf_model_name"):
        refuse(f"uses a Hugging Face text encoder ({text['hf_model_name']})")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        refuse(f"has non-square images {list(size)}")
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if width % head_width:
        refuse(f"has a vision width {width} that is not a multiple of head_width {head_width}")
    for side, cfg, defaults in (("vision_cfg", vision, _VISION_DEFAULTS), ("text_cfg", text, _TEXT_DEFAULTS)):
        for key, default in defaults.items():
            value = cfg.get(key, default)
            if key == "block_type" and value in (None, "default"):
                continue
            if value != default:
                refuse(f"sets {side}.{key} = {value!r}")


# ----------------------------------------------------------------------------- OpenCLIP side


def load_openclip(model: str, weights: str | None = None, config_file: str | None = None):
    """(open_clip CLIP in float32 eval mode, its model config dict, its eval preprocess).

    model: a built-in OpenCLIP name (with `weights`: a local .safetensors/.pt/.bin file), or
    `hf-hub:org/repo` / `local-dir:/path` (weights come from there). config_file registers an
    extra OpenCLIP model config JSON (its file stem is the name).
    """
    import open_clip

    if config_file is not None:
        if not Path(config_file).is_file():
            raise ExportError(f"OpenCLIP model config {config_file} does not exist.")
        open_clip.add_model_config(config_file)
    schema = model.split(":", 1)[0] + ":" if model.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None:
        if model.replace("/", "-") not in open_clip.list_models():
            raise ExportError(f"OpenCLIP has no model '{model}'; pick one from open_clip.list_models(), pass --config "
                              "for a custom architecture, or use an hf-hub: / local-dir: id.")
        if weights is None:
            raise ExportError(f"--weights is needed with the built-in architecture '{model}' (a local checkpoint file).")
        if not Path(weights).exists():
            raise ExportError(f"OpenCLIP weights file {weights} does not exist.")
        if not Path(weights).is_file():
            raise ExportError(f"OpenCLIP weights file {weights} is not a regular file; pass a .safetensors, .pt or .bin file.")
    elif weights is not None:
        raise ExportError(f"--weights does not apply to '{model}': its weights come from that {schema[:-1]} source.")
    try:
        model_cfg = open_clip.get_model_config(model)
    except (OSError, ValueError) as error:
        raise ExportError(f"the OpenCLIP config of '{model}' could not be read ({str(error).splitlines()[0][:150]}).") from error
    if model_cfg is None:
        raise ExportError(f"the OpenCLIP config of '{model}' could not be found.")
    check_supported(model_cfg, model)
    if weights is not None:
        problem = weights_file_problem(Path(weights))
        if problem is not None:
            raise ExportError(f"OpenCLIP weights file {weights} {problem}; pass a .safetensors file or a .pt/.bin "
                              "holding only the state dict's tensors.")
    try:
        oc_model, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device="cpu")
    except pickle.UnpicklingError as error:  # a legacy (non-zip) pickle that torch's weights-only load refuses
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ExportError(f"OpenCLIP weights file {weights} holds a pickled '{found.group(1) if found else 'object'}', not only "
                          "tensors, so it is not loaded (unpickling it could run code); pass a .safetensors file or a "
                          "state dict of tensors.") from None
    except (OSError, RuntimeError, ValueError) as error:
        raise ExportError(f"OpenCLIP could not load '{model}' ({str(error).splitlines()[0][:200]}).") from error
    if type(oc_model) is not open_clip.CLIP or type(oc_model.visual).__name__ != "VisionTransformer":
        raise ExportError(f"not supported: OpenCLIP built {type(oc_model).__name__} for '{model}', not its CLIP class.")
    return oc_model.float().eval(), model_cfg, preprocess


def openclip_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenCLIP's BPE vocabulary (shipped inside open_clip) as a CLIPTokenizer vocab and merges.

    The same construction as open_clip.tokenizer.SimpleTokenizer: 256 byte symbols, the same
    with the end-of-word suffix, one symbol per merge, then the two special tokens last.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(merge.split()) for merge in merges] + [BOS, EOS]
    return {symbol: i for i, symbol in enumerate(symbols)}, [tuple(merge.split()) for merge in merges]


def build_clip_tokenizer(context_length: int):
    """A transformers CLIPTokenizer that tokenizes as OpenCLIP's SimpleTokenizer: lowercased, whitespace
    collapsed, <|startoftext|> ... <|endoftext|>, truncated keeping the EOT last.

    It pads with <|endoftext|> (as OpenAI's CLIP tokenizer on the Hub), where OpenCLIP pads with id 0:
    padding is masked out by the attention mask, and a pad token of "!" (id 0) would become a special
    token that swallows every "!" in the text.
    """
    from transformers import CLIPTokenizer

    vocab, merges = openclip_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tokenizer.model_max_length = context_length
    tokenizer.padding_side = "right"
    return tokenizer


def build_image_processor(preprocess_cfg: dict[str, Any]):
    """CLIPImageProcessor equal to OpenCLIP's eval preprocess: resize the shortest side, centre crop, mean/std."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
        raise ExportError(f"not supported: OpenCLIP's preprocess resize_mode '{preprocess_cfg['resize_mode']}' (mmcl "
                          "and CLIPImageProcessor resize the shortest side).")
    size = preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    resample = Image.BILINEAR if preprocess_cfg.get("interpolation") == "bilinear" else Image.BICUBIC
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=int(resample), do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(preprocess_cfg.get("mean")), image_std=list(preprocess_cfg.get("std")), do_convert_rgb=True,
    )


# ----------------------------------------------------------------------------- weights


def hf_clip_config(model_cfg: dict[str, Any], tokenizer):
    """The CLIPConfig of an OpenCLIP model config (checked by `check_supported`)."""
    from transformers import CLIPConfig

    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"  # OpenCLIP: QuickGELU or nn.GELU (erf)
    size = vision.get("image_size", 224)
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    vision_config = dict(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision.get("layers", 12), num_attention_heads=v_width // vision.get("head_width", 64),
        image_size=size[0] if isinstance(size, (list, tuple)) else size, patch_size=vision.get("patch_size", 16),
        hidden_act=act, layer_norm_eps=1e-5, attention_dropout=0.0, projection_dim=model_cfg["embed_dim"])
    # The pooler takes the first <|endoftext|>, which is where OpenCLIP's argmax lands (EOT is the largest id).
    text_config = dict(
        vocab_size=text.get("vocab_size", 49408), hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)), num_hidden_layers=text.get("layers", 12),
        num_attention_heads=text.get("heads", 8), max_position_embeddings=text.get("context_length", 77),
        hidden_act=act, layer_norm_eps=1e-5, attention_dropout=0.0, projection_dim=model_cfg["embed_dim"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=model_cfg["embed_dim"])


# OpenCLIP residual-block parameter -> transformers CLIP encoder-layer parameter (both directions use it).
RESBLOCK_NAMES = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                  ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


# One two-way table between OpenCLIP CLIP's names and a transformers CLIP tower's (its names inside
# the tower): `map_tower` reads it in either direction (mmcl/export/openclip.py writes OpenCLIP
# weights through it, `openclip_to_hf_state` reads them).
TOWER_NAMES = (  # (OpenCLIP name, side, name inside that side's transformers tower)
    ("visual.conv1.weight", "image", "embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "image", "embeddings.class_embedding"),
    ("visual.positional_embedding", "image", "embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", "image", "pre_layrnorm.weight"), ("visual.ln_pre.bias", "image", "pre_layrnorm.bias"),
    ("visual.ln_post.weight", "image", "post_layernorm.weight"), ("visual.ln_post.bias", "image", "post_layernorm.bias"),
    ("token_embedding.weight", "text", "embeddings.token_embedding.weight"),
    ("positional_embedding", "text", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "text", "final_layer_norm.weight"), ("ln_final.bias", "text", "final_layer_norm.bias"),
)
OPENCLIP_STACKS = {"image": "visual.transformer", "text": "transformer"}  # where each side's resblocks live


def map_tower(state: dict[str, torch.Tensor], side: str, prefix: str, layers: int,
              to_openclip: bool) -> dict[str, torch.Tensor]:
    """One CLIP tower's weights renamed between OpenCLIP's names and layouts and a transformers
    tower's under `prefix` ("vision_model", or mmcl's "image_tower"): the TOWER_NAMES of `side`
    and its `layers` blocks, whose fused attention in_proj [3W, W] is q/k/v_proj [W, W] each.
    `to_openclip` picks the direction; the inverse call gives the input back."""
    out = {}
    for openclip_name, name_side, tower_name in TOWER_NAMES:
        if name_side == side:
            if to_openclip:
                out[openclip_name] = state[f"{prefix}.{tower_name}"]
            else:
                out[f"{prefix}.{tower_name}"] = state[openclip_name]
    for i in range(layers):
        block, layer = f"{OPENCLIP_STACKS[side]}.resblocks.{i}.", f"{prefix}.encoder.layers.{i}."
        for openclip_name, tower_name in RESBLOCK_NAMES:
            for kind in ("weight", "bias"):
                if to_openclip:
                    out[f"{block}{openclip_name}.{kind}"] = state[f"{layer}{tower_name}.{kind}"]
                else:
                    out[f"{layer}{tower_name}.{kind}"] = state[f"{block}{openclip_name}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv"]
            if to_openclip:
                out[f"{block}attn.in_proj_{kind}"] = torch.cat([state[name] for name in qkv])
            else:
                out.update(zip(qkv, state[f"{block}attn.in_proj_{kind}"].chunk(3, dim=0)))
    return out


def openclip_to_hf_state(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict -> CLIPModel's names and layouts (see the module docstring)."""
    out = {
        **map_tower(state, "image", "vision_model", vision_layers, to_openclip=False),
        **map_tower(state, "text", "text_model", text_layers, to_openclip=False),
        # OpenCLIP stores x @ proj, the transpose of a Linear weight
        "visual_projection.weight": state["visual.proj"].t(),
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in out.items()}


def openclip_to_hf(oc_model, model_cfg: dict[str, Any], tokenizer):
    """CLIPModel (float32, eval) holding the weights of the OpenCLIP CLIP `oc_model`."""
    from transformers import CLIPModel

    hf = CLIPModel(hf_clip_config(model_cfg, tokenizer)).eval()
    state = openclip_to_hf_state(oc_model.state_dict(), hf.config.vision_config.num_hidden_layers,
                                 hf.config.text_config.num_hidden_layers)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]  # buffers, rebuilt by the model
    if missing or unexpected:
        raise ExportError(f"the OpenCLIP weights do not fit CLIPModel ({missing[:2]} missing, {unexpected[:2]} unexpected); "
                          "this is a bug in mmcl's converter, please report it.")
    return hf


# ----------------------------------------------------------------------------- checks


def relative_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |a - b| / max(1, max |a|)."""
    reference, other = reference.detach().float(), other.detach().float()
    if reference.shape != other.shape:
        return float("inf")
    return ((reference - other).abs().max() / reference.abs().max().clamp(min=1.0)).item()


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output holds it (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hf_tokens(tokenizer, texts, context_length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}


def compare(oc_model, hf, tokenizer, texts, pixel_values: torch.Tensor) -> dict[str, float]:
    """Token-id mismatches and max relative embedding differences between OpenCLIP and the CLIPModel."""
    import open_clip

    context_length = oc_model.context_length
    oc_ids = open_clip.tokenize(list(texts), context_length=context_length)
    tokens = hf_tokens(tokenizer, texts, context_length)
    with torch.no_grad():
        image = relative_diff(oc_model.encode_image(pixel_values), _features(hf.get_image_features(pixel_values=pixel_values)))
        text = relative_diff(oc_model.encode_text(oc_ids), _features(hf.get_text_features(**tokens)))
    kept = tokens["attention_mask"].bool()  # OpenCLIP pads with 0, this tokenizer with <|endoftext|> (masked)
    mismatches = int(((oc_ids != tokens["input_ids"]) & kept).sum() + (kept != (oc_ids != 0)).sum())
    return {"token_mismatches": mismatches, "image_max_diff": image, "text_max_diff": text}


def crop_offsets_agree(height: int, width: int, size: int) -> bool:
    """True when torchvision's and transformers' centre crops start at the same pixel for this image.

    Both resize the shorter side to `size` and the longer one to int(size * long / short); a
    half-pixel crop offset is rounded to even by torchvision (OpenCLIP) and floored by transformers,
    so they differ by one pixel when (long side - size) % 4 == 3.
    """
    long_side = int(size * max(height, width) / min(height, width))
    return (long_side - size) % 4 != 3


def processor_diff(processor, preprocess, size: int) -> dict[str, Any]:
    """Max |difference| between the CLIPImageProcessor and OpenCLIP's preprocess on odd-sized random images,
    per transformers backend: `max_abs_diff` where the crop offsets agree, `one_pixel_shift_max_abs_diff`
    where they do not (see crop_offsets_agree)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    rng = np.random.default_rng(0)
    shapes = [(2 * size + 3, 3 * size + 2), (size + 5, size + 5), (3 * size, 2 * size + 1), (size * 3 + 1, size * 2 - 1)]
    shapes += [(h, w) for h in (size + 7, 2 * size + 1) for w in (size + 13, 3 * size + 5)]
    images = [(crop_offsets_agree(h, w, size), Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
              for h, w in shapes]
    result: dict[str, Any] = {"probe_images": len(images), "probe_images_with_agreeing_crop": sum(a for a, _ in images)}
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        for backend in ("pil", "torchvision"):  # transformers 5 has both; the saved file selects neither
            try:
                loaded = AutoImageProcessor.from_pretrained(folder, backend=backend)
            except (TypeError, ValueError, ImportError):
                continue
            for agree, key in ((True, "max_abs_diff"), (False, "one_pixel_shift_max_abs_diff")):
                diffs = [float((loaded(images=image, return_tensors="pt")["pixel_values"][0] - preprocess(image)).abs().max())
                         for same, image in images if same == agree]
                result[f"{backend}_{key}"] = max(diffs, default=None)
    return result


# ----------------------------------------------------------------------------- the command


def convert_openclip(model: str, out_dir: str | Path, weights: str | None = None, config_file: str | None = None,
                     overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Convert an OpenCLIP checkpoint to a CLIPModel folder; returns (folder, report)."""
    from transformers import CLIPProcessor

    out = check_convert_out(model, out_dir, overwrite=overwrite, weights=weights, config_file=config_file)
    oc_model, model_cfg, preprocess = load_openclip(model, weights, config_file)
    tokenizer = build_clip_tokenizer(oc_model.context_length)
    hf = openclip_to_hf(oc_model, model_cfg, tokenizer)
    preprocess_cfg = dict(getattr(oc_model.visual, "preprocess_cfg", {}) or {})
    preprocess_cfg.setdefault("mean", oc_model.visual.image_mean)
    preprocess_cfg.setdefault("std", oc_model.visual.image_std)
    preprocess_cfg.setdefault("size", hf.config.vision_config.image_size)
    processor = build_image_processor(preprocess_cfg)

    size = hf.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {
        "source": {"model": model, "weights": Path(weights).name if weights else None},
        "architecture": {"embed_dim": model_cfg["embed_dim"], "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                         "image_size": size, "context_length": oc_model.context_length},
        "logit_scale": float(oc_model.logit_scale.detach().exp()),
        **compare(oc_model, hf, tokenizer, PROBE_CAPTIONS, pixels),
        "image_processor": processor_diff(processor, preprocess, size),
        "tolerance": TOLERANCE,
    }
    if report["token_mismatches"] or not max(report["image_max_diff"], report["text_max_diff"]) <= TOLERANCE:
        raise ExportError(f"the converted model does not reproduce OpenCLIP (token mismatches {report['token_mismatches']}, "
                          f"image {report['image_max_diff']:.1e}, text {report['text_max_diff']:.1e}); this is a bug in "
                          "mmcl's converter, please report it.")

    with staged(out) as staging:
        hf.save_pretrained(str(staging))
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out, report
