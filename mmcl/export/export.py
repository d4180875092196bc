"""Write an export: a folder `transformers` loads offline, with everything needed to trust it.

    <out>/
      config.json, model.safetensors   VisionTextDualEncoderModel / CLIPModel (image-text runs)
                                       or the image tower's own class (image-only runs): AutoModel
      processor_config.json            VisionTextDualEncoderProcessor: CLIPImageProcessor + tokenizer
      preprocessor_config.json         the image processor alone (AutoImageProcessor, older transformers)
      tokenizer.json, tokenizer_config.json, ...
      mmcl_export.json                 poolings, heads, what plain transformers reproduces, transform, source,
                                       and "files": the names this export consists of (what `mmcl push` uploads)
      mmcl_heads.safetensors           mmcl's projection heads, logit scale and bias
      mmcl_config.yaml                 the run's config (named so the folder is not mistaken for an mmcl model dir)
      metrics.json, training.png       the run's final metrics and plot, when the run has them
      README.md                        the model card
      adapters/image|text/             with `adapters=True` and LoRA towers: each tower's peft adapter folder
                                       (not among "files": `mmcl push` uploads the merged model alone)

The folder is written aside and renamed into place only after `load_exported` has reproduced
the model's embeddings from it, so an export that exists is an export that works.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from mmcl.export.errors import ExportError
from mmcl.export.hf_loader import HEADS_FILE, INFO_FILE
from mmcl.export.source import RunFacts, Source, load_model, read_facts
from mmcl.export.staging import check_export_out, check_out, staged
from mmcl.redact import redact_tree

FORMAT_VERSION = 1
CONFIG_COPY = "mmcl_config.yaml"
ADAPTERS_DIR = "adapters"  # peft adapter folders of LoRA towers, one per side (export option)


def export_run(run_or_checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False,
               license: str | None = None, datasets: Sequence[str] | None = None, trust_checkpoint: bool = False,
               adapters: bool = False) -> Path:
    """Export a run directory, one of its checkpoints or its model/ folder to `out_dir`; returns the folder.

    license: the card's license id (default "other"); datasets: Hub dataset ids for the card
    (default: names taken from the run's shard paths); trust_checkpoint: unpickle a checkpoint
    fully (see mmcl.export.source); adapters: also write LoRA towers' adapters as peft adapter
    folders (`adapters/<side>/`).
    """
    out, source = check_export_out(run_or_checkpoint, out_dir, overwrite=overwrite, trust_checkpoint=trust_checkpoint)
    model, config, tokenizer = load_model(source)
    return export_model(model, config, tokenizer, out, facts=read_facts(source), source=source, overwrite=overwrite,
                        license=license, datasets=datasets, adapters=adapters)


def export_model(model, config, tokenizer, out_dir: str | Path, *, facts: RunFacts | None = None,
                 source: Source | None = None, overwrite: bool = False, license: str | None = None,
                 datasets: Sequence[str] | None = None, adapters: bool = False) -> Path:
    """Export an in-memory DualEncoder built from the RunConfig `config` (with its tokenizer, or None).

    The model is put in float32 eval mode on the CPU in place, its LoRA adapters merged into the
    towers; pass a copy to keep yours as it is.
    """
    from mmcl.config import config_to_dict
    from mmcl.export.card import render_card
    from mmcl.export.convert import convert

    out = check_out(out_dir, overwrite=overwrite)
    facts = facts or RunFacts(config=config_to_dict(config))
    run_dir = source.run_dir if source is not None else None
    # no machine paths and no credentials leave with the model
    facts.config = redact_tree(portable_paths(facts.config or config_to_dict(config), run_dir))
    with staged(out) as staging:
        model = model.float().eval().cpu()
        _merge_adapters(model, config, staging / ADAPTERS_DIR if adapters else None)
        hf, reports, probes = convert(model, config, tokenizer)
        hf.save_pretrained(str(staging))
        _save_processor(staging, config, tokenizer)
        _save_heads(staging, model)
        info = _info(model, config, hf, reports, source)
        info["processor_check"] = processor_check(staging, info["image_transform"])
        (staging / CONFIG_COPY).write_text(yaml.safe_dump(facts.config, sort_keys=False))
        if facts.metrics is not None:
            (staging / "metrics.json").write_text(json.dumps(redact_tree(facts.metrics), indent=2) + "\n")
        if facts.plot is not None:
            shutil.copyfile(facts.plot, staging / "training.png")
        # what the export consists of: `mmcl push` uploads exactly these
        files = sorted({p.name for p in staging.iterdir() if not p.name.startswith(".") and p.name != ADAPTERS_DIR}
                       | {INFO_FILE}) + ["README.md"]
        info["files"] = files
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (staging / "README.md").write_text(render_card(info, facts, ".", files, license=license, datasets=datasets,
                                                       name=out.name))
        verify(staging, model, probes, info)
    return out


def _merge_adapters(model, config, folder: Path | None) -> None:
    """Fold LoRA adapters into their towers (in place); with `folder`, first save them there as peft adapters."""
    from mmcl.models.lora import has_lora, merge_lora, save_lora_adapter

    for kind in ("image", "text"):
        tower = getattr(model, f"{kind}_tower", None)
        if tower is None or not has_lora(tower):
            continue
        if folder is not None:
            tower_cfg = getattr(config.model, kind)
            name = tower_cfg.name_or_path if tower_cfg is not None else None
            hub_id = name if name and not name.startswith(("/", ".", "~")) and not Path(name).exists() else None
            save_lora_adapter(tower, folder / kind, base_model=hub_id)  # no local paths leave with the model
        merge_lora(tower)


def _run_relative(path: Path, run_dir: Path | None) -> str:
    """`path` relative to the run directory when inside it, else its name alone."""
    path = Path(path).resolve()
    if run_dir is not None and path.is_relative_to(Path(run_dir).resolve()):
        return path.relative_to(Path(run_dir).resolve()).as_posix() or "."
    return path.name


def portable_paths(value: Any, run_dir: Path | None = None) -> Any:
    """A copy of a config dict in which no value names a place on this machine.

    Absolute paths become relative to the run directory (inside it) or to the working directory
    (inside that), else their last three components ("digits/train/{00000..00003}.tar" keeps the
    dataset's name for the card); `::`-joined shard lists are handled part by part; URLs and
    hub ids are left alone.
    """
    if isinstance(value, dict):
        return {key: portable_paths(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_paths(item, run_dir) for item in value]
    if not isinstance(value, str) or not value.startswith(("/", "~")) and "::" not in value:
        return value
    return "::".join(_portable_path(part.strip(), run_dir) for part in value.split("::"))


def _portable_path(text: str, run_dir: Path | None) -> str:
    if not text.startswith(("/", "~")):
        return text
    path = Path(os.path.expanduser(text))
    for root in (run_dir, Path.cwd()):
        if root is not None and path.is_relative_to(Path(root).resolve()) and path != Path(root).resolve():
            return path.relative_to(Path(root).resolve()).as_posix()
    return Path(*path.parts[-3:]).as_posix() if len(path.parts) > 3 else path.name


def _save_processor(folder: Path, config, tokenizer):
    """CLIPImageProcessor set to mmcl's eval transform (+ the tokenizer, padded to context_length);
    with `data.naflex`, a Siglip2Processor (`_save_naflex_processor`)."""
    from transformers import CLIPImageProcessor, VisionTextDualEncoderProcessor

    from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

    if getattr(config.data, "naflex", None) is not None:
        return _save_naflex_processor(folder, config, tokenizer)
    size = config.data.image_size
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL.Image.BICUBIC, as torchvision's Resize
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
        image_mean=list(config.data.image_mean or CLIP_MEAN), image_std=list(config.data.image_std or CLIP_STD),
    )
    image_processor.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = config.model.text.context_length  # truncation=True then cuts where mmcl did
        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return image_processor


def _save_naflex_processor(folder: Path, config, tokenizer):
    """Siglip2ImageProcessor with mmcl's NaFlex transform (patch size, maximum patches, bilinear, mean/std),
    in a Siglip2Processor with the tokenizer.

    Siglip2Processor's class defaults (16 px patches, 256 patches, 64 tokens) take precedence over its
    image processor's saved settings when it is called; the tokenizer's saved init arguments take
    precedence over those defaults (transformers' ProcessorMixin._merge_kwargs), so the patch size,
    the patch count and the context length are written there too and plain AutoProcessor uses them.
    """
    from transformers import Siglip2ImageProcessor, Siglip2Processor

    from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

    naflex = config.data.naflex
    image_processor = Siglip2ImageProcessor(
        patch_size=naflex.patch_size, max_num_patches=naflex.max_num_patches, resample=2,  # bilinear, antialiased
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(config.data.image_mean or CLIP_MEAN), image_std=list(config.data.image_std or CLIP_STD),
    )
    image_processor.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)
        length = config.model.text.context_length
        tokenizer.model_max_length = length
        tokenizer.init_kwargs.update(patch_size=naflex.patch_size, max_num_patches=naflex.max_num_patches,
                                     max_length=length, padding_side=tokenizer.padding_side)
        Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return image_processor


def _save_heads(folder: Path, model) -> None:
    from safetensors.torch import save_file

    keep = ("image_projection.", "text_projection.")
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()
             if name.startswith(keep) or name in ("logit_scale", "logit_bias")}
    save_file(state, str(folder / HEADS_FILE), metadata={"format": "pt"})


def _info(model, config, hf, reports, source: Source | None) -> dict[str, Any]:
    import mmcl

    dual = model.text_tower is not None
    info: dict[str, Any] = {
        "format": "mmcl-export",
        "format_version": FORMAT_VERSION,
        "mmcl_version": mmcl.__version__,
        "architecture": type(hf).__name__ if dual else "image_tower",
        "embed_dim": config.model.embed_dim,
        **{kind: report.to_dict() for kind, report in reports.items()},
        "logit_scale": float(model.logit_scale.detach().clamp(max=model.logit_scale_max_log).exp()),
        "logit_scale_max": config.model.logit_scale_max,
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "image_transform": _image_transform_info(config),
        "source": {
            "path": _run_relative(source.weights, source.run_dir) if source else None,
            "kind": ("model_dir" if source.model_dir is not None else "checkpoint") if source else "in_memory",
            "step": source.step if source else None,
        },
    }
    for kind, tower in (("image", model.image_tower), ("text", model.text_tower)):
        if kind in info:  # sizes for the card
            info[kind]["parameters"] = sum(p.numel() for p in tower.parameters())
            info[kind]["hidden_size"] = getattr(tower.config, "hidden_size", None)
            info[kind]["num_hidden_layers"] = getattr(tower.config, "num_hidden_layers", None)
    if dual:
        info["text_inputs"] = {"context_length": config.model.text.context_length, "padding": "max_length", "truncation": True}
    return info


def _image_transform_info(config) -> dict[str, Any]:
    from mmcl.data.transforms import CLIP_MEAN, CLIP_STD

    mean, std = list(config.data.image_mean or CLIP_MEAN), list(config.data.image_std or CLIP_STD)
    naflex = getattr(config.data, "naflex", None)
    if naflex is not None:
        return {"naflex": {"patch_size": naflex.patch_size, "max_num_patches": naflex.max_num_patches},
                "image_size": None,
                "resize": "aspect ratio kept, patch grid fits max_num_patches, bilinear (antialiased)",
                "crop": "none; patches padded to max_num_patches", "mean": mean, "std": std}
    return {"image_size": config.data.image_size, "resize": "shorter side to image_size, bicubic (PIL)",
            "crop": "center, image_size x image_size", "mean": mean, "std": std}


def _naflex_processor_check(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| between the saved processor (plain AutoProcessor) and mmcl's NaFlex transform."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor

    from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch

    naflex = spec["naflex"]
    array = np.random.default_rng(0).integers(0, 256, (53, 127, 3), dtype=np.uint8)
    reference = naflex_batch([NaFlexPatchesU8(naflex["patch_size"], naflex["max_num_patches"])(
        torch.from_numpy(array).permute(2, 0, 1).contiguous())], spec["mean"], spec["std"])
    result = {"probe_image": [127, 53]}
    processors = {"torchvision": AutoImageProcessor.from_pretrained(str(folder))}
    if (folder / "processor_config.json").is_file():
        processors["processor"] = AutoProcessor.from_pretrained(str(folder))
    for name, processor in processors.items():
        got = processor(images=[Image.fromarray(array)], return_tensors="pt")
        same_grid = torch.equal(got["spatial_shapes"], reference["spatial_shapes"])
        result[f"{name}_max_abs_diff"] = float((got["pixel_values"] - reference["pixel_values"]).abs().max()) \
            if same_grid and got["pixel_values"].shape == reference["pixel_values"].shape else float("inf")
    return result


def processor_check(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Max |difference| between the saved processor and mmcl's eval transform on a probe image, per backend."""
    if "naflex" in spec:
        return _naflex_processor_check(folder, spec)
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from mmcl.evaluation.loading import eval_transform

    size = spec["image_size"]
    height, width = 2 * size + 3, 3 * size + 1
    # torchvision's CenterCrop rounds a half-pixel offset to even, transformers floors it: they
    # differ by one pixel when the resized long side exceeds image_size by 3 (mod 4). Probe an
    # image where they agree, so the number measures the resize and arithmetic alone.
    while (int(size * width / height) - size) % 4 == 3:
        width += 1
    array = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    reference = eval_transform(size, spec["mean"], spec["std"])(image)
    result = {"probe_image": [width, height]}
    for backend in ("pil", "torchvision"):
        processor = AutoImageProcessor.from_pretrained(str(folder), backend=backend)
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        result[f"{backend}_max_abs_diff"] = float((pixels - reference).abs().max())
    return result


def verify(folder: Path, model, probes: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Reload `folder` and check it reproduces `model`: always through load_exported, and through
    plain transformers for every side the export calls exact. Raises ExportError otherwise."""
    from mmcl.export.convert import TOLERANCE, relative_diff
    from mmcl.export.hf_loader import load_exported
    from mmcl.models import pool

    from mmcl.export.convert import image_inputs

    exported = load_exported(folder)
    pixels = probes["pixel_values"]
    images = image_inputs(probes)
    with torch.no_grad():
        checks = [("image embeddings (mmcl loader)", model.encode_image(**images, normalize=False),
                   exported.encode_image(**images, normalize=False))]
        if "text" in info:
            ids, mask = probes["input_ids"], probes["attention_mask"]
            reference = model.encode_text(ids, mask, normalize=False)
            checks.append(("text embeddings (mmcl loader)", reference, exported.encode_text(ids, mask, normalize=False)))
            if info["text"]["exact"]:
                checks.append(("text embeddings (transformers)", reference,
                               exported.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output))
            if info["image"]["exact"]:
                checks.append(("image embeddings (transformers)", checks[0][1],
                               exported.model.get_image_features(**images).pooler_output))
        elif info["image"]["exact"]:
            pooled = pool(model.image_tower(pixel_values=pixels), info["image"]["pooling"], "image")
            checks.append(("pooled image features (transformers)", pooled, exported.model(pixel_values=pixels).pooler_output.flatten(1)))
    for what, expected, got in checks:
        difference = relative_diff(expected, got)
        if not difference <= TOLERANCE:
            raise ExportError(f"the export in {folder} does not reproduce the model's {what} (difference {difference:.1e}); this is a bug in mmcl's export, please report it.")
