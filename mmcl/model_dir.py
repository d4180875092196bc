"""The one definition of the folders mmcl writes and reads: what each holds, how it is written and read.

An **mmcl model directory** (the trainer's `<output_dir>/model/`; evaluation, export and
distillation read it)
    config.yaml        the resolved RunConfig (`mmcl.config.save_config`); towers that were
                       loaded from `name_or_path` are written with their inline transformers
                       `config` instead, so the directory loads without the original weights
    model.safetensors  the DualEncoder's full state_dict (every name, tied weights included)
    tokenizer/         optional; a `save_pretrained` tokenizer that overrides model.text.tokenizer
`save_model_dir` writes one, `load_mmcl_model_dir` reads it.

A **run directory** (`output_dir`) holds config.yaml, `model/` (when training finished) and
`checkpoints/` (DeepSpeed checkpoints, `latest` naming the newest); `mmcl.export.source.locate`
picks the weights out of one.

An **export** (`mmcl.export.export_run`) is a `transformers` `save_pretrained` folder
(config.json, model.safetensors, tokenizer and preprocessor files) plus `mmcl_export.json`
(how mmcl encodes: pooling, image transform, text inputs, which sides are exact) and
`mmcl_heads.safetensors` (the projection heads and the logit scale/bias); it is read back by
`mmcl.export.load_exported` (`mmcl/export/hf_loader.py`).

A **teacher directory** (`distill.teacher`) is any of: an export, an mmcl model directory, or
a `transformers` CLIP / SigLIP / VisionTextDualEncoder folder (config.json); `kind_of` tells
which. This module imports torch only inside the functions that load or save weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

CONFIG_FILE = "config.yaml"  # the RunConfig, in a model directory and a run directory alike
WEIGHTS_FILE = "model.safetensors"  # a model directory's state_dict (and, by transformers' name, an export's weights)
TOKENIZER_DIR = "tokenizer"  # a model directory's saved tokenizer
MODEL_DIR = "model"  # the model directory inside a finished run's output_dir
CHECKPOINTS_DIR = "checkpoints"  # the DeepSpeed checkpoints inside a run's output_dir
EXPORT_INFO_FILE = "mmcl_export.json"  # an export's record of how mmcl encodes
EXPORT_HEADS_FILE = "mmcl_heads.safetensors"  # an export's projection heads and logit scale/bias
TRANSFORMERS_CONFIG = "config.json"  # a transformers save_pretrained folder (an export is one)

FolderKind = Literal["export", "model_dir", "transformers", "checkpoint"]


def kind_of(path: str | Path) -> FolderKind | None:
    """What the folder `path` holds: an mmcl export, an mmcl model directory, another transformers
    folder, a DeepSpeed checkpoint (or a folder of them), or None (none of these)."""
    path = Path(path)
    if (path / EXPORT_INFO_FILE).is_file():
        return "export"
    if is_model_dir(path):
        return "model_dir"
    if (path / TRANSFORMERS_CONFIG).is_file():
        return "transformers"
    if (path / "latest").is_file() or list(path.glob("global_step*")) or list(path.glob("*model_states.pt")):
        return "checkpoint"
    return None


def model_location(spec: str) -> str | None:
    """Where a `--model` argument points: `spec` itself (a folder, a file, `openclip:ARCH`, `hf-hub:ID`), or the
    model/ folder of a run directory; None when `spec` names a local path that does not exist."""
    if spec.startswith(("openclip:", "hf-hub:")):
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    if path.is_dir() and kind_of(path) is None and kind_of(path / MODEL_DIR) == "model_dir":
        return str(path / MODEL_DIR)
    return str(path)


def save_model_dir(model: nn.Module, config: Any, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Write an mmcl model directory (see the module docstring) and return its path.

    model: a DualEncoder; config: the RunConfig it was built from; tokenizer: a
    `transformers` tokenizer (saved to tokenizer/) or None.
    """
    from safetensors.torch import save_file

    from mmcl.config import save_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(_self_contained(config, model, (out / TOKENIZER_DIR) if tokenizer is not None else None), out / CONFIG_FILE)
    # Own copies: under DeepSpeed ZeRO the parameters are views into one flat buffer (which
    # safetensors refuses to save); tied weights are simply stored under each of their names.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


# Keys of a transformers config that describe where it came from, not the architecture (and
# id2label, whose int keys a RunConfig cannot hold; it only matters for classification heads).
PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "id2label", "label2id")


def _self_contained(config: Any, model: nn.Module, tokenizer_dir: Path | None) -> Any:
    """A copy of `config` whose towers are inline transformers configs (no external weights needed)."""
    import copy

    config = copy.deepcopy(config)
    sides = [("image", config.model.image, getattr(model, "image_tower", None))]
    if config.model.text is not None:
        sides.append(("text", config.model.text, getattr(model, "text_tower", None)))
    for side, tower_cfg, tower in sides:
        if tower_cfg.name_or_path is None or not hasattr(getattr(tower, "config", None), "to_diff_dict"):
            continue
        inline = {k: v for k, v in tower.config.to_diff_dict().items() if k not in PROVENANCE_KEYS}
        if side == "text" and tower_cfg.tokenizer is None and tokenizer_dir is None:
            tower_cfg.tokenizer = tower_cfg.name_or_path  # the tokenizer still comes from there
        tower_cfg.config, tower_cfg.name_or_path = inline, None
    if tokenizer_dir is not None and config.model.text is not None:
        config.model.text.tokenizer = str(tokenizer_dir.resolve())
    config.model.init_from = None  # model.safetensors holds every weight, heads and logit scale included
    return config


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_mmcl_model_dir(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Any, Any]:
    """(DualEncoder in eval mode on `device`, RunConfig, tokenizer or None) from a model directory."""
    import yaml
    from safetensors.torch import load_file

    from mmcl.config import from_dict

    path = Path(path)
    _check_model_dir(path)
    raw = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    if (path / TOKENIZER_DIR).is_dir() and raw.get("model", {}).get("text"):
        raw["model"]["text"]["tokenizer"] = str(path / TOKENIZER_DIR)
    config = from_dict(raw, source=str(path / CONFIG_FILE))
    try:
        from mmcl.models import build_model, build_tokenizer
    except ImportError as error:
        raise RuntimeError(f"mmcl.models is not available ({error}); it is needed to load {path}.") from error
    model = build_model(config.model)
    # Every name is stored (tied weights under each of their names), so a plain strict check works.
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS_FILE} does not match the model in {CONFIG_FILE} "
            f"({len(missing)} missing keys, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})."
        )
    tokenizer = build_tokenizer(config.model.text) if config.model.text is not None else None
    return model.to(device).eval(), config, tokenizer


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist.")
    if is_model_dir(path):
        return
    if (path / "latest").is_file() or list(path.glob("global_step*")):
        raise ValueError(f"{path} is a DeepSpeed training checkpoint, not an mmcl model directory; export it first (not supported yet).")
    if (path / TRANSFORMERS_CONFIG).is_file():
        raise ValueError(f"{path} looks like a transformers export; loading those for evaluation is not supported yet — pass an mmcl model directory ({CONFIG_FILE} + {WEIGHTS_FILE}).")
    raise ValueError(f"{path} is not an mmcl model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
