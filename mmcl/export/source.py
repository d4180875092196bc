"""Where an export's weights and run facts come from: a run directory, a checkpoint or a model dir.

`locate(path)` accepts
    <output_dir>                      a training run: its finished model/ folder, or its latest
                                      checkpoint when model/ is missing or older than it
    <output_dir>/checkpoints          the latest checkpoint of that run
    <output_dir>/checkpoints/step_N   that DeepSpeed checkpoint (any ZeRO stage)
    <output_dir>/model (or any mmcl model directory: config.yaml + model.safetensors)
and `load_model(source)` returns the DualEncoder in float32 and eval mode. A DeepSpeed
checkpoint is consolidated with DeepSpeed's own `zero_to_fp32` (the fp32 master weights, so
bf16/fp16 runs export full precision). Its files are pickles: `locate` refuses a checkpoint
whose files differ from its manifest (mmcl/manifest.py) or whose pickles hold anything but
tensors and DeepSpeed's own types, and the consolidation unpickles weights-only
(mmcl/safe_unpickle.py), unless `trust_checkpoint` (`mmcl export --trust-checkpoint`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.export.errors import ExportError
from mmcl.model_dir import CHECKPOINTS_DIR as CHECKPOINTS
from mmcl.model_dir import CONFIG_FILE, MODEL_DIR, WEIGHTS_FILE
from mmcl.model_dir import PROVENANCE_KEYS as _PROVENANCE_KEYS
from mmcl.redact import redact_tree

LATEST = "latest"


@dataclass
class Source:
    """What `locate` found. Exactly one of `model_dir` / `checkpoint` holds the weights."""

    run_dir: Path | None = None  # the run's output_dir, when known (config.yaml, metrics, plot)
    model_dir: Path | None = None  # an mmcl model directory
    checkpoint: Path | None = None  # <root>/<tag> of a DeepSpeed checkpoint
    step: int | None = None  # optimizer step of the weights, when known
    trusted: bool = False  # unpickle the checkpoint fully (the user trusts its author)

    @property
    def weights(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.checkpoint  # type: ignore[return-value]


@dataclass
class RunFacts:
    """Everything about the run that the model card reports (all optional)."""

    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml as written by the trainer
    metrics: dict[str, Any] | None = None  # metrics.json
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    deepspeed: dict[str, Any] | None = None  # deepspeed_config.json
    plot: Path | None = None  # training.png


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def _step_of(tag: str) -> int | None:
    match = re.search(r"(\d+)$", tag)
    return int(match.group(1)) if match else None


def _latest(root: Path) -> Path | None:
    latest = root / LATEST
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    if not _is_checkpoint(folder):
        raise ExportError(f"{latest} names checkpoint '{folder.name}', which is missing or incomplete; pass a checkpoints/step_* folder instead.")
    return folder


def locate(path: str | Path, trust_checkpoint: bool = False) -> Source:
    """Classify `path` (see the module docstring); raises ExportError when it holds no weights, or
    a checkpoint that is damaged or holds pickled objects (unless `trust_checkpoint`)."""
    source = _locate(Path(path).expanduser())
    if source.checkpoint is not None:
        _check_checkpoint(source.checkpoint, trust_checkpoint)
        source.trusted = trust_checkpoint
    return source


TRUST_HINT = "pass --trust-checkpoint"


def _check_checkpoint(folder: Path, trust: bool) -> None:
    """A damaged checkpoint (files that differ from its manifest) or one with foreign pickles: ExportError."""
    from mmcl import manifest
    from mmcl.safe_unpickle import check_pickles

    if manifest.read_manifest(folder) is not None:
        problem = manifest.damage(folder)
        if problem is not None:
            older = sorted((p for p in folder.parent.glob("step_*") if p.name < folder.name), reverse=True)
            previous = next((p for p in older if manifest.damage(p) is None), None)
            instead = f"export the previous intact one, {previous}" if previous else "restore it from a copy"
            raise ExportError(f"checkpoint {folder} is damaged ({problem}); {instead}.")
    check_pickles(folder, TRUST_HINT, trust, error=ExportError)


def _locate(path: Path) -> Source:
    if not path.exists():
        raise ExportError(f"{path} does not exist; pass a run directory (output_dir), one of its checkpoints/step_* folders or its model/ folder.")
    if _is_model_dir(path):
        run_dir = path.parent if (path.parent / CONFIG_FILE).is_file() and path.name == MODEL_DIR else None
        metrics = _read_json(run_dir / "metrics.json") if run_dir else None
        return Source(run_dir=run_dir, model_dir=path, step=(metrics or {}).get("steps"))
    if _is_checkpoint(path):
        run_dir = path.parent.parent if (path.parent.parent / CONFIG_FILE).is_file() else None
        return Source(run_dir=run_dir, checkpoint=path, step=_step_of(path.name))
    if (path / LATEST).is_file():  # the checkpoints/ folder itself
        checkpoint = _latest(path)
        run_dir = path.parent if (path.parent / CONFIG_FILE).is_file() else None
        return Source(run_dir=run_dir, checkpoint=checkpoint, step=_step_of(checkpoint.name))
    if (path / CONFIG_FILE).is_file():  # a run directory
        checkpoint = _latest(path / CHECKPOINTS) if (path / CHECKPOINTS).is_dir() else None
        metrics = _read_json(path / "metrics.json")
        finished_step = (metrics or {}).get("steps")
        checkpoint_step = _step_of(checkpoint.name) if checkpoint else None
        # model/ is written when training ends; a later resume that was stopped leaves it older than `latest`.
        if _is_model_dir(path / MODEL_DIR) and (checkpoint_step is None or finished_step == checkpoint_step):
            return Source(run_dir=path, model_dir=path / MODEL_DIR, step=finished_step)
        if checkpoint is not None:
            return Source(run_dir=path, checkpoint=checkpoint, step=checkpoint_step)
        raise ExportError(f"run directory {path} has neither a finished model/ folder nor a checkpoint yet; export it after training saved one.")
    raise ExportError(
        f"{path} is not a run directory, a checkpoint or an mmcl model directory; pass the run's output_dir, "
        "one of its checkpoints/step_* folders or its model/ folder."
    )


# ----------------------------------------------------------------------------- run facts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def read_facts(source: Source) -> RunFacts:
    """The run's config, metrics, per-step records, DeepSpeed config and plot, as far as they exist."""
    facts = RunFacts()
    config_path = (source.run_dir or source.model_dir or Path("/nonexistent")) / CONFIG_FILE
    if config_path.is_file():
        facts.config = redact_tree(yaml.safe_load(config_path.read_text()) or {})  # runs of older mmcl wrote secrets
    if source.run_dir is None:
        return facts
    facts.metrics = _read_json(source.run_dir / "metrics.json")
    facts.deepspeed = _read_json(source.run_dir / "deepspeed_config.json")
    jsonl = source.run_dir / "metrics.jsonl"
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            with contextlib.suppress(ValueError):
                if line.strip():
                    facts.records.append(json.loads(line))
    if (source.run_dir / "training.png").is_file():
        facts.plot = source.run_dir / "training.png"
    return facts


# ----------------------------------------------------------------------------- weights


def _model_config(raw: dict[str, Any], tokenizer_dir: Path | None, where: Path):
    """A validated RunConfig with what building the model and its transform need (eval paths may have moved)."""
    from mmcl.config import ConfigError, from_dict

    if "model" not in raw:
        raise ExportError(f"{where} has no 'model' section; it is not an mmcl run config.")
    model = copy.deepcopy(raw["model"])
    if tokenizer_dir is not None and model.get("text"):
        model["text"]["tokenizer"] = str(tokenizer_dir)
    # data: image size and normalisation (its shard patterns are not checked for existence).
    minimal = {"model": model, "objectives": raw.get("objectives") or {"clip": 1.0}, "data": raw.get("data") or {}}
    try:
        return from_dict(minimal, source=str(where))
    except ConfigError as error:
        raise ExportError(str(error)) from error


def _architecture_only(config) -> None:
    """Replace pretrained towers (`name_or_path`) by their configs: the weights come from the checkpoint."""
    from transformers import AutoConfig

    sides = [config.model.image] + ([config.model.text] if config.model.text is not None else [])
    for tower in sides:
        if tower.name_or_path is None or tower.name_or_path == config.model.init_from:
            continue  # init_from's towers are rebuilt from it by mmcl.pretrained.build_model (a model dir has no config.json)
        try:
            inline = AutoConfig.from_pretrained(tower.name_or_path).to_diff_dict()
        except (OSError, ValueError) as error:
            raise ExportError(
                f"the config of tower '{tower.name_or_path}' could not be read ({str(error).splitlines()[0][:150]}); "
                "export the run's model/ folder instead, or make the tower's config.json available."
            ) from error
        if getattr(tower, "tokenizer", "unset") is None:
            tower.tokenizer = tower.name_or_path  # the tokenizer still comes from there
        tower.config = {k: v for k, v in inline.items() if k not in _PROVENANCE_KEYS}
        tower.name_or_path = None


def consolidate(checkpoint: Path, trust: bool = False) -> dict[str, Any]:
    """Full fp32 state dict of the DualEncoder from a DeepSpeed checkpoint folder (any ZeRO stage).

    DeepSpeed's loaders unpickle fully; here they load tensors and DeepSpeed's types only, unless `trust`."""
    from mmcl.safe_unpickle import restricted_unpickling

    with restricted_unpickling(str(checkpoint), TRUST_HINT, trust, error=ExportError):
        return _consolidate(checkpoint)


def _consolidate(checkpoint: Path) -> dict[str, Any]:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):  # DeepSpeed prints its progress on stdout
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    except (ValueError, FileNotFoundError) as error:
        # No ZeRO (stage 0): the model states file holds the full module (loaded as DeepSpeed does, in the block above).
        states = checkpoint / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise ExportError(f"{checkpoint} is not a complete DeepSpeed checkpoint ({str(error).splitlines()[0][:150]}).") from error
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in torch.load(states, map_location="cpu", weights_only=False)["module"].items()}
    # The engine wraps TrainingTask, whose DualEncoder is its `model` attribute.
    return {name[len("model."):]: tensor for name, tensor in state.items() if name.startswith("model.")}


def load_model(source: Source):
    """(DualEncoder in eval mode, float32, on CPU; RunConfig of the model; tokenizer or None)."""
    import torch
    from safetensors.torch import load_file

    from mmcl.models import build_tokenizer
    from mmcl.pretrained import build_model

    if source.model_dir is not None:
        folder = source.model_dir
        raw = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
        tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        config = _model_config(raw, tokenizer_dir, folder / CONFIG_FILE)
        state = load_file(str(folder / WEIGHTS_FILE))
    else:
        if source.run_dir is None:
            raise ExportError(f"checkpoint {source.checkpoint} is not inside a run directory (config.yaml two folders up); export from the run directory.")
        model_dir = source.run_dir / MODEL_DIR
        # model/config.yaml is self-contained (inline tower configs); config.yaml may name pretrained towers.
        config_path = model_dir / CONFIG_FILE if (model_dir / CONFIG_FILE).is_file() else source.run_dir / CONFIG_FILE
        raw = yaml.safe_load(config_path.read_text()) or {}
        tokenizer_dir = model_dir / "tokenizer" if (model_dir / "tokenizer").is_dir() else None
        config = _model_config(raw, tokenizer_dir, config_path)
        _architecture_only(config)
        state = consolidate(source.checkpoint, source.trusted)

    torch.manual_seed(0)  # the random init is overwritten; seeding only keeps runs reproducible
    model = build_model(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # zero_to_fp32 stores a tied weight once; the tie itself restores the other name.
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"the weights in {source.weights} do not match the model in its config ({len(set(missing) - tied)} missing, "
            f"e.g. {sorted(set(missing) - tied)[:1]}; {len(unexpected)} unexpected, e.g. {list(unexpected)[:1]})."
        )
    tokenizer = build_tokenizer(config.model.text) if config.model.text is not None else None
    return model.float().eval(), config, tokenizer


def _is_tied(model, name: str) -> bool:
    """True when parameter `name` shares its storage with another parameter that was loaded."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    target = tensors.get(name)
    return target is not None and any(t is target for n, t in tensors.items() if n != name)
