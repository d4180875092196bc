"""The run configuration: YAML files plus `key.sub=value` overrides, validated once; loading and saving.

Each section's dataclass lives beside the code it configures, with its keys documented as
field comments and its own rules in `validate` (`mmcl.models.settings`, `mmcl.data.settings`,
`mmcl.engine.settings`, `mmcl.evaluation.settings`, `mmcl.export.settings`), and each
objective's settings in its torch-free declaration (`mmcl.objectives.settings`, placed in the
run config at the objective's `settings_key`). This module assembles `RunConfig` from them, as
plain dataclasses, and holds the rules that span sections. It imports no torch. `load_config` raises `ConfigError` — one sentence naming the file,
the key and what to do — before any process group, model or data loader exists; the type
coercion and bounds checks are `mmcl.coerce`. README's configuration reference is generated
from these dataclasses (`python -m mmcl.docs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmcl.coerce import ConfigError, build, count, nonnegative
from mmcl.data.settings import DataConfig, ViewsConfig
from mmcl.engine.settings import LogConfig, OptimConfig, TrainConfig, WandbConfig  # noqa: F401 (WandbConfig re-exported)
from mmcl.evaluation.settings import EvalConfig
from mmcl.export.settings import PushConfig
from mmcl.models.settings import ModelConfig, TextTowerConfig, TowerConfig  # noqa: F401 (re-exported: mmcl.config names every section)
from mmcl.objectives import OBJECTIVES, needs_of
from mmcl.objectives.settings import (BYOLConfig, ClipQueueConfig, DistillConfig, MoCoConfig, SimCLRConfig, SimSiamConfig,
                                      TripletConfig)

# ----------------------------------------------------------------------------- the run config


@dataclass
class LossConfig:
    """Options shared by the image-text objectives, and the settings of those that have them (clip_queue)."""

    # Side of the score-matrix chunks of the chunked exact clip/siglip loss. "auto": dense while
    # one evaluation's logits (local rows x global columns) are at most 4096^2, chunked above
    # (mmcl.losses.chunked.recommended_chunk_size); None: always dense; an int: always chunked.
    chunk_size: int | Literal["auto"] | None = count("auto")
    clip_queue: ClipQueueConfig = field(default_factory=ClipQueueConfig)


@dataclass
class SSLConfig:
    """Settings of the self-supervised objectives (used when `objectives` names them)."""

    views: ViewsConfig = field(default_factory=ViewsConfig)  # the two augmented views of each image
    # BatchNorm in the SSL heads over the global batch (all ranks), as the recipes do; off:
    # each rank's own batch. Costs two small all-reduces per BatchNorm layer and step.
    sync_batchnorm: bool = False
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    triplet: TripletConfig = field(default_factory=TripletConfig)


@dataclass
class RunConfig:
    """A whole run. Only `model` is required."""

    model: ModelConfig
    objectives: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})  # weighted sum, e.g. {clip: 1.0, simclr: 1.0}
    loss: LossConfig = field(default_factory=LossConfig)  # image-text loss options (and clip_queue's settings)
    ssl: SSLConfig = field(default_factory=SSLConfig)  # the self-supervised objectives' views and settings
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)  # experiment trackers besides metrics.jsonl and TensorBoard (log.wandb)
    push_to_hub: PushConfig | None = None  # export + upload when training ends
    output_dir: str = "runs/default"  # checkpoints, logs and the resolved config go here
    seed: int = nonnegative(0)  # seeds model init, data order and augmentation
    distill: DistillConfig = field(default_factory=DistillConfig)

KNOWN_OBJECTIVES = tuple(OBJECTIVES)
IMAGE_TEXT_OBJECTIVES = tuple(name for name, objective in OBJECTIVES.items() if objective.image_text)


def uses_text(config: RunConfig) -> bool:
    """Whether an objective needs the text tower (the image-text objectives, or triplet on image-text pairs)."""
    return "text" in needs_of(config.objectives, config)


def uses_views(config: RunConfig) -> bool:
    """Whether an objective needs the two augmented views of each image."""
    return "views" in needs_of(config.objectives, config)

# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, source: str) -> Any:
    """The parsed YAML of a config file; every way it can fail is one ConfigError sentence."""
    if not path.exists():
        raise ConfigError(f"config file {source} does not exist.")
    if path.is_dir():
        raise ConfigError(f"config file {source} is a folder; give the run's YAML file.")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {source} is not a text file (it is not UTF-8); give the run's YAML file.") from None
    except OSError as error:
        raise ConfigError(f"config file {source} cannot be read ({error.strerror or error}).") from None
    if not text.strip():
        raise ConfigError(f"config file {source} is empty; a run config needs at least a `model:` section "
                          "(see configs/demo.yaml).")
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        opened = getattr(error, "context_mark", None)
        if opened is not None and getattr(error, "context", None):  # e.g. an unclosed [ opened earlier
            problem += f"; {error.context} at line {opened.line + 1}, column {opened.column + 1}"
        raise ConfigError(f"{source}: not valid YAML{where} ({problem}).") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides and validate it.

    Relative paths inside the file are resolved against the current working directory
    (the way `deepspeed train.py` users run it from the repo root).
    """
    source = str(path)
    raw = _read_yaml(Path(path), source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(raw).__name__}.")
    for override in overrides:
        apply_override(raw, override)
    try:
        return from_dict(raw, source=source)
    except ConfigError as error:
        # Name the command line, not the file, when the offending key came from an override.
        message = str(error)
        for override in overrides:
            parts = override.partition("=")[0].strip().split(".")
            prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
            if any(f"'{prefix}'" in message for prefix in prefixes):
                raise ConfigError(message.replace(f"{source}:", f"command-line override '{override}' (on {source}):", 1)) from None
        raise


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Build and validate a RunConfig from plain data (as parsed from YAML)."""
    from mmcl.models.init_source import expand_init_from

    config = build(RunConfig, expand_init_from(raw, source), key="", source=source)
    _check_run(config, source)
    return config


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML (so `3` is an int)."""
    if "=" not in override:
        raise ConfigError(f"command-line override '{override}' must look like key.sub=value.")
    dotted, _, text = override.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"command-line override '{override}' has an empty key part.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"command-line override '{override}': '{'.'.join(keys[:depth + 1])}' is a value, not a section."
            )
        node = child
    node[keys[-1]] = value


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dicts/lists, ready for YAML or JSON."""
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, credentials redacted (`mmcl.redact`): `load_config(path)`
    returns an equal object unless a shard string carried one."""
    from mmcl.redact import redact_tree

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(redact_tree(config_to_dict(config)), sort_keys=False))


# ----------------------------------------------------------------------------- rules across sections


def _check_run(config: RunConfig, source: str) -> None:
    """Rules that span sections: the objectives against the towers and each other (each section's
    own rules ran in its `validate` while it was built)."""
    if not config.objectives:
        raise ConfigError(f"{source}: 'objectives' must name at least one objective (e.g. clip: 1.0).")
    for name, weight in config.objectives.items():
        if name not in OBJECTIVES:
            suggestion = difflib.get_close_matches(name, KNOWN_OBJECTIVES, n=1)
            hint = f" — did you mean '{suggestion[0]}'?" if suggestion else f" (known: {', '.join(KNOWN_OBJECTIVES)})."
            raise ConfigError(f"{source}: unknown objective 'objectives.{name}'{hint}")
        if weight < 0:
            raise ConfigError(f"{source}: 'objectives.{name}' weight must be >= 0, got {weight}.")
        if OBJECTIVES[name].image_text and config.model.text is None:
            raise ConfigError(f"{source}: objective '{name}' needs a text tower ('model.text').")
    for objective in OBJECTIVES.values():
        objective.check(config, source)
    _check_captions_from_labels(config, source)
    _check_naflex(config, source)
    if not uses_text(config):
        _check_image_only(config, source)


NAFLEX_TOWERS = ("siglip2_vision_model", "siglip2")  # inline image tower model types that take NaFlex patches
NAFLEX_OBJECTIVES = ("clip", "siglip", "distill")  # the objectives that read NaFlex pixel_values (no square views, no momentum copies)


def _check_naflex(config: RunConfig, source: str) -> None:
    """`data.naflex` feeds patch sequences: an inline image tower must take them, and pairs of square
    SSL views cannot ride along. (A tower by name_or_path is checked when it is built.)"""
    naflex = config.data.naflex
    tower = config.model.image.config
    if naflex is None:
        if tower is not None and tower.get("model_type") in NAFLEX_TOWERS:
            raise ConfigError(f"{source}: 'model.image' is a SigLIP 2 tower, which takes NaFlex patch sequences; set "
                              "'data.naflex' (e.g. {patch_size: 16, max_num_patches: 256}).")
        return
    if tower is not None and tower.get("model_type") not in NAFLEX_TOWERS:
        raise ConfigError(f"{source}: 'data.naflex' makes patch sequences for SigLIP 2 image towers, but 'model.image' "
                          f"is a '{tower.get('model_type')}' tower; remove data.naflex or use siglip2_vision_model.")
    if tower is not None and tower.get("patch_size", 16) != naflex.patch_size:
        raise ConfigError(f"{source}: 'data.naflex.patch_size' is {naflex.patch_size} but the image tower's patch_size is "
                          f"{tower.get('patch_size', 16)}; make them equal.")
    others = sorted(set(config.objectives) - set(NAFLEX_OBJECTIVES))
    if others:
        raise ConfigError(f"{source}: 'data.naflex' trains with {', '.join(NAFLEX_OBJECTIVES)} so far, not "
                          f"{', '.join(others)}; remove those objectives or data.naflex.")
    if "store" in OBJECTIVES["distill"].needs_for(config) and "distill" in config.objectives:
        raise ConfigError(f"{source}: 'distill.store' replays square stored crops, which 'data.naflex' cannot use; "
                          "distil from a live teacher (distill.teacher) instead.")


def _check_captions_from_labels(config: RunConfig, source: str) -> None:
    """FLYP (`data.captions_from_labels`) captions images with class prompts for the clip objective."""
    if not config.data.captions_from_labels:
        return
    if config.eval.classnames is None:
        raise ConfigError(f"{source}: 'data.captions_from_labels' makes captions from the class names; set "
                          "'eval.classnames' (label i is the i-th name) and 'eval.templates'.")
    others = [name for name in config.objectives if OBJECTIVES[name].image_text and name != "clip"]
    if "clip" not in config.objectives or others:
        raise ConfigError(f"{source}: 'data.captions_from_labels' trains with the clip objective, which leaves "
                          f"same-class pairs out of the negatives; use objectives: {{clip: 1.0}}"
                          + (f" instead of {', '.join(others)}." if others else "."))


def _check_image_only(config: RunConfig, source: str) -> None:
    """Runs without clip/siglip (SimCLR, BYOL alone) train the image tower only."""
    names = ", ".join(config.objectives)
    if config.model.text is not None:
        raise ConfigError(
            f"{source}: 'model.text' is set but no objective uses a text tower ({names}); remove model.text "
            "for an image-only run or add clip/siglip to 'objectives'."
        )
    if config.model.image.projection != "none":
        raise ConfigError(
            f"{source}: 'model.image.projection' is {config.model.image.projection} but nothing trains it without "
            "clip/siglip; set model.image.projection: none (and model.embed_dim to the tower's width) so the "
            "exported encoder gives the pooled tower features."
        )
    width = (config.model.image.config or {}).get("hidden_size")  # the pooled width of ViT-like towers
    if config.model.image.pooling != "embeds" and isinstance(width, int) and width != config.model.embed_dim:
        raise ConfigError(
            f"{source}: 'model.embed_dim' is {config.model.embed_dim} but the image tower's width is {width} and "
            f"an image-only run has no projection; set model.embed_dim to {width}."
        )
    for key in ("zeroshot_shards", "retrieval_shards"):
        if getattr(config.eval, key) is not None:
            raise ConfigError(f"{source}: 'eval.{key}' needs a text tower; image-only runs evaluate with eval.knn_train_shards / eval.knn_test_shards.")
