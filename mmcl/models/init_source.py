"""What `model.init_from` names, and the config keys it fills in (no torch, no transformers).

`model.init_from: SOURCE` starts a run from a pretrained two-tower model. SOURCE is one of

| kind        | recognised by                                   | towers            | heads carried                      |
|-------------|-------------------------------------------------|-------------------|------------------------------------|
| `clip`      | config.json `model_type: clip`                  | CLIPVision/TextModel | visual/text_projection (linear) |
| `siglip`    | config.json `model_type: siglip`                | SiglipVision/TextModel | none (SigLIP's heads are in its towers), + logit bias |
| `siglip2`   | config.json `model_type: siglip2`               | Siglip2Vision/TextModel | as `siglip`; fills `data.naflex` from its processor |
| `vtde`      | config.json `model_type: vision-text-dual-encoder` | its two towers | visual/text_projection (linear)    |
| `export`    | `mmcl_export.json` (`mmcl export`)               | the export's towers | mmcl_heads.safetensors (any head) |
| `model_dir` | `config.yaml` + `model.safetensors` (a run's model/) | the model's towers | every head                      |

Every kind carries the logit scale. `expand_init_from` fills, where the config leaves them unset:
each tower's `name_or_path` (= SOURCE; `mmcl.models.init_from` builds and loads it), its pooling
and projection (what makes step 0 equal the source's `get_*_features`), `embed_dim`,
`text.context_length`, `text.tokenizer` (model dirs), `logit_bias_init` (SigLIP), and
`data.image_size` / `image_mean` / `image_std` from the source's processor (SigLIP 2: `data.naflex`'s
patch size and maximum number of patches instead of the image size).
"""
from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any

import yaml

from mmcl.coerce import ConfigError, check_path

EXPORT_INFO, HEADS_FILE = "mmcl_export.json", "mmcl_heads.safetensors"
MODEL_DIR_CONFIG, MODEL_DIR_WEIGHTS, MODEL_DIR_TOKENIZER = "config.yaml", "model.safetensors", "tokenizer"
TWO_TOWER_TYPES = {"clip": "clip", "siglip": "siglip", "siglip2": "siglip2", "vision-text-dual-encoder": "vtde"}
SUB_CONFIG = {"image": "vision_config", "text": "text_config"}
WHAT_IT_CAN_BE = ("a transformers CLIPModel, SiglipModel, Siglip2Model or VisionTextDualEncoderModel folder or hub id, an "
                  "`mmcl export` folder or an mmcl model directory (a run's model/)")


def read_json(folder_or_hub_id: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of a local folder or (through the Hub cache or network) a Hub repo; None if absent."""
    local = Path(folder_or_hub_id).expanduser()
    if local.is_dir():
        path = local / filename
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(folder_or_hub_id, filename))
        except Exception:  # offline, missing repo or file: the caller decides whether that is an error
            return None
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def source_kind(init_from: str) -> tuple[str | None, dict[str, Any] | None]:
    """(kind, what describes it): kind is one of the table's, or None with the config.json (or None) found."""
    local = Path(init_from).expanduser()
    if (local / MODEL_DIR_CONFIG).is_file() and (local / MODEL_DIR_WEIGHTS).is_file():
        return "model_dir", yaml.safe_load((local / MODEL_DIR_CONFIG).read_text()) or {}
    info = read_json(init_from, EXPORT_INFO)
    if info is not None:
        return "export", info
    config = read_json(init_from, "config.json")
    if config is None and not local.exists():
        return "clip", {"model_type": "clip"}  # a hub id not reachable now (offline): the towers' loading reports it
    return TWO_TOWER_TYPES.get((config or {}).get("model_type")), config


def read_image_processor(init_from: str) -> dict[str, Any]:
    """The source's image processor settings: preprocessor_config.json, else processor_config.json's part."""
    processor = read_json(init_from, "preprocessor_config.json")
    if processor is None:
        processor = (read_json(init_from, "processor_config.json") or {}).get("image_processor")
    return processor if isinstance(processor, dict) else {}


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header (no tensor is read)."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def safetensors_scalar(path: Path, name: str) -> float | None:
    """The value of a one-element float32 tensor of a local safetensors file; None when there is none."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        entry = json.loads(handle.read(size)).get(name)
        if not entry or entry["dtype"] != "F32" or entry["data_offsets"][1] - entry["data_offsets"][0] != 4:
            return None
        handle.seek(8 + size + entry["data_offsets"][0])
        return struct.unpack("<f", handle.read(4))[0]


def expand_init_from(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """With `model.init_from: SOURCE`, fill the keys it decides where the config leaves them unset."""
    model = raw.get("model") if isinstance(raw, dict) else None
    init_from = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(init_from, str):
        return raw  # absent, or a type error the section's build reports
    check_path(init_from, "model.init_from", source, hub_id_allowed=True)
    kind, described = source_kind(init_from)
    if kind is None:
        what = "has no readable config.json" if described is None else f"is a '{described.get('model_type')}' model"
        raise ConfigError(f"{source}: 'model.init_from' = '{init_from}' {what}, which has no image and text tower "
                          f"with a shared embedding space to start from; it must be {WHAT_IT_CAN_BE}.")
    raw = copy.deepcopy(raw)
    model, data = raw["model"], raw.setdefault("data", {})
    if not isinstance(data, dict):
        data = {}  # a type error the data section's build reports
    sides = ["image"] + (["text"] if model.get("text", {}) is not None else [])
    for side in sides:
        model.setdefault(side, {})
    fill = {"clip": _clip, "siglip": _siglip, "siglip2": _siglip2, "vtde": _vtde, "export": _export, "model_dir": _model_dir}[kind]
    carried = fill(init_from, described, model, data, source)  # side -> (pooling, projection) the source computes
    for side in sides:
        tower = model[side]
        if not isinstance(tower, dict) or "name_or_path" in tower or "config" in tower:
            continue  # the user's own tower: nothing of the source's is carried on that side
        if side not in carried:
            raise ConfigError(f"{source}: 'model.init_from' = '{init_from}' has no {side} tower; give "
                              f"'model.{side}.name_or_path' or 'model.{side}.config' (or set model.{side}: null).")
        tower["name_or_path"] = init_from
        pooling, projection = carried[side]
        if pooling is not None:
            tower.setdefault("pooling", pooling)
        if projection is not None:
            given = tower.setdefault("projection", projection)
            if given != projection:
                raise ConfigError(f"{source}: 'model.{side}.projection' is {given} but 'model.init_from' = '{init_from}' "
                                  f"carries a {projection} projection, which cannot become {given}; remove "
                                  f"model.{side}.projection to start from it.")
    return raw


def _image_data(data: dict, size: Any, processor: dict[str, Any] | None) -> None:
    processor = processor or {}
    crop = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(crop, dict):
        size = crop.get("height", crop.get("shortest_edge", size))
    elif isinstance(crop, int):
        size = crop
    if isinstance(size, int):
        data.setdefault("image_size", size)
    for key in ("image_mean", "image_std"):
        if key in processor:
            data.setdefault(key, processor[key])


def _text(model: dict) -> dict | None:
    return model["text"] if isinstance(model.get("text"), dict) else None


def _clip(init_from, config, model, data, source):
    text_config, vision_config = config.get("text_config") or {}, config.get("vision_config") or {}
    if _text(model) is not None and "max_position_embeddings" in text_config:
        model["text"].setdefault("context_length", text_config["max_position_embeddings"])
    if "projection_dim" in config:
        model.setdefault("embed_dim", config["projection_dim"])
    if "image_size" in vision_config:
        data.setdefault("image_size", vision_config["image_size"])
    processor = read_image_processor(init_from)
    for key in ("image_mean", "image_std"):
        if key in processor:
            data.setdefault(key, processor[key])
    return {"image": (None, "linear"), "text": (None, "linear")}


def _siglip(init_from, config, model, data, source):
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    width = vision.get("hidden_size", 768)
    text_width = text.get("projection_size") or text.get("hidden_size", 768)
    if _text(model) is not None and "name_or_path" not in model["text"] and "config" not in model["text"] \
            and text_width != width:
        raise ConfigError(f"{source}: 'model.init_from' = '{init_from}' is a SiglipModel whose image width {width} "
                          f"and text width {text_width} differ, so it has no shared embedding space to start from.")
    model.setdefault("embed_dim", width)
    model.setdefault("logit_bias_init", -10.0)  # a placeholder: the source's learnt bias replaces it
    scale = safetensors_scalar(Path(init_from).expanduser() / MODEL_DIR_WEIGHTS, "logit_scale")
    if scale is not None and math.exp(scale) > 100.0:  # trained SigLIPs pass mmcl's default cap of 100
        model.setdefault("logit_scale_max", math.ceil(math.exp(scale) * 1000) / 1000)
    if _text(model) is not None:
        model["text"].setdefault("context_length", text.get("max_position_embeddings", 64))
    _image_data(data, vision.get("image_size", 224), read_image_processor(init_from))
    return {"image": ("pooler_output", "none"), "text": ("pooler_output", "none")}


def _siglip2(init_from, config, model, data, source):
    """As `_siglip` (the same heads and bias), with NaFlex inputs: the processor's patch size and
    maximum number of patches (else the vision config's), and its normalisation."""
    vision = config.get("vision_config") or {}
    carried = _siglip(init_from, {**config, "vision_config": {**vision, "image_size": None}}, model, data, source)
    processor = read_image_processor(init_from)
    naflex = data.setdefault("naflex", {})
    if isinstance(naflex, dict):
        naflex.setdefault("patch_size", processor.get("patch_size", vision.get("patch_size", 16)))
        naflex.setdefault("max_num_patches", processor.get("max_num_patches", vision.get("num_patches", 256)))
    return carried


def _vtde(init_from, config, model, data, source):
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    model.setdefault("embed_dim", config.get("projection_dim", 512))
    positions = text.get("max_position_embeddings")
    if _text(model) is not None and isinstance(positions, int) and positions < 77:
        model["text"].setdefault("context_length", positions)  # else mmcl's 77 (BERT's 512 would be slow for captions)
    _image_data(data, vision.get("image_size", 224), read_image_processor(init_from))
    # get_image_features / get_text_features: the tower's pooler_output through a bias-free linear
    return {"image": ("pooler_output", "linear"), "text": ("pooler_output", "linear")}


def _export(init_from, info, model, data, source):
    carried = {}
    for side in ("image", "text"):
        if side in info:
            carried[side] = (info[side]["pooling"], info[side]["projection"])
            tower = model.get(side) if isinstance(model.get(side), dict) else None
            if tower is not None and "name_or_path" not in tower and "config" not in tower:
                tower.setdefault("model_class", info[side]["tower_class"])
    model.setdefault("embed_dim", info["embed_dim"])
    model.setdefault("logit_scale_max", info["logit_scale_max"])
    if info.get("logit_bias") is not None:
        model.setdefault("logit_bias_init", info["logit_bias"])
    if _text(model) is not None and "text_inputs" in info:
        model["text"].setdefault("context_length", info["text_inputs"]["context_length"])
    if any(projection == "mlp" for _, projection in carried.values()) and Path(init_from).expanduser().is_dir():
        shapes = safetensors_shapes(Path(init_from).expanduser() / HEADS_FILE)
        hidden = next(shape[0] for name, shape in shapes.items() if name.endswith("projection.0.weight"))
        model.setdefault("mlp_hidden_dim", hidden)
    spec = info["image_transform"]
    data.setdefault("image_size", spec["image_size"])
    data.setdefault("image_mean", spec["mean"])
    data.setdefault("image_std", spec["std"])
    return carried


def _model_dir(init_from, config, model, data, source):
    theirs = config.get("model") or {}
    carried = {}
    for side in ("image", "text"):
        tower = theirs.get(side)
        if not isinstance(tower, dict):
            continue
        carried[side] = (tower.get("pooling", "auto"), tower.get("projection", "linear"))
        ours = model.get(side) if isinstance(model.get(side), dict) else None
        if ours is not None and "name_or_path" not in ours and "config" not in ours and tower.get("model_class"):
            ours.setdefault("model_class", tower["model_class"])
    for key in ("embed_dim", "mlp_hidden_dim", "logit_scale_max", "logit_bias_init"):
        if theirs.get(key) is not None:
            model.setdefault(key, theirs[key])
    text = _text(model)
    if text is not None and isinstance(theirs.get("text"), dict):
        if "context_length" in theirs["text"]:
            text.setdefault("context_length", theirs["text"]["context_length"])
        folder = Path(init_from).expanduser() / MODEL_DIR_TOKENIZER
        tokenizer = str(folder.resolve()) if folder.is_dir() else theirs["text"].get("tokenizer")
        if tokenizer is not None and "name_or_path" not in text and "config" not in text:
            text.setdefault("tokenizer", tokenizer)
    for key in ("image_size", "image_mean", "image_std"):
        if (config.get("data") or {}).get(key) is not None:
            data.setdefault(key, config["data"][key])
    return carried
