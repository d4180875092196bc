"""Typed run configuration: YAML files plus `key.sub=value` overrides, validated once.

Every config key is documented here, as a field comment on its dataclass; README.md shows
a complete annotated example. `load_config` raises `ConfigError` — one sentence naming the
file, the key and what to do — before any process group, model or data loader exists.
This module imports neither torch nor transformers so validation is instant.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

PATH = {"path": True}  # field metadata: the value is a local path that must exist
MODEL_PATH = {"model_path": True}  # field metadata: a local path that must exist, or a hub id


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one sentence."""


# ----------------------------------------------------------------------------- sections


@dataclass
class TowerConfig:
    """One tower: any `transformers` model, pretrained (`name_or_path`) or random (`config`)."""

    name_or_path: str | None = field(default=None, metadata=MODEL_PATH)  # local dir or hub id, loaded with Auto classes
    config: dict[str, Any] | None = None  # inline transformers config (needs `model_type`); random init
    model_class: str | None = None  # optional transformers class name, e.g. CLIPVisionModelWithProjection
    pooling: Literal["auto", "cls", "mean", "pooler_output", "eos", "embeds"] = "auto"  # how tokens become one vector
    projection: Literal["linear", "mlp", "none"] = "linear"  # head to the shared embedding space
    lock: bool = False  # freeze the tower (LiT); with unlocked_layers > 0 only its first layers
    unlocked_layers: int = 0  # with lock: keep the last N layers (and the norms after them) trainable
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    attn_implementation: str | None = None  # "eager" / "sdpa" / ...; None lets transformers pick
    # image towers with token outputs (vit, deit, clip/siglip vision, dinov2): in training, drop this fraction
    # of the patch tokens per image after the position embeddings (FLIP); class/register tokens are kept
    patch_dropout: float = 0.0


@dataclass
class TextTowerConfig(TowerConfig):
    """A text tower plus its tokenizer."""

    tokenizer: str | None = field(default=None, metadata=MODEL_PATH)  # AutoTokenizer dir or hub id; default name_or_path
    context_length: int = 77  # tokens per caption after padding/truncation


@dataclass
class ModelConfig:
    """The dual encoder: image tower, text tower, shared embedding space, logit scale/bias."""

    image: TowerConfig  # required
    text: TextTowerConfig | None = None  # None for image-only (SSL) runs
    embed_dim: int = 512  # shared embedding dimension
    mlp_hidden_dim: int | None = None  # hidden width of `mlp` projections; default max(tower width, embed_dim)
    logit_scale_init: float = 1 / 0.07  # initial multiplier of the cosine similarities (CLIP: 1/0.07)
    logit_scale_max: float = 100.0  # the effective multiplier is clamped to this in the forward pass
    logit_bias_init: float | None = None  # learnable logit bias (sigmoid loss; SigLIP uses -10); None = no bias
    # a transformers CLIPModel folder or hub id (e.g. from `mmcl convert openclip`): both towers, their linear
    # projections and the logit scale start from it; fills in model.image/text.name_or_path, embed_dim,
    # text.context_length and data.image_size/image_mean/image_std where they are not set
    init_from: str | None = field(default=None, metadata=MODEL_PATH)


@dataclass
class LossConfig:
    """Options shared by the contrastive objectives."""

    # Side of the score-matrix tiles of the tiled exact clip/siglip loss. "auto": dense while
    # one evaluation's logits (local rows x global columns) are at most 4096^2, tiled above
    # (mmcl.losses.tiled.recommended_chunk_size); None: always dense; an int: always tiled.
    chunk_size: int | Literal["auto"] | None = "auto"
    clip_queue: ClipQueueConfig = field(default_factory=lambda: ClipQueueConfig())  # the clip_queue objective


@dataclass
class ClipQueueConfig:
    """The `clip_queue` objective: CLIP's InfoNCE plus queued negatives from momentum towers (ALBEF-style)."""

    size: int = 4096  # queued image and text features (each) used as extra negatives
    base_momentum: float = 0.995  # momentum towers' EMA momentum at the first step (ALBEF: 0.995) ...
    final_momentum: float = 1.0  # ... cosine to this at the last step
    distill: float = 0.0  # ALBEF's momentum distillation: target = distill * momentum softmax + (1 - distill) * one-hot


@dataclass
class DistillConfig:
    """The `distill` objective: the student's image-text logits follow a frozen teacher's softmax
    over the same global batch (OpenCLIP's DistillClipLoss; combine with clip by weight).

    The teacher runs outside DeepSpeed (not trained, not partitioned, not checkpointed: resume
    loads it again from `teacher` and checks the weights' SHA-256), replicated on every rank,
    and sees its own inputs: the same decoded image at its own size and normalisation (the
    student's random crop box, or its centre crop when `cache_dir` is set) and the caption
    through its own tokenizer.
    """

    # "openclip:<architecture>" (with `weights`), "hf-hub:<org>/<name>" (an OpenCLIP model on the
    # Hub; needs a network), or a local directory: a transformers CLIP / SigLIP /
    # VisionTextDualEncoder model (e.g. an mmcl export) or an mmcl model directory.
    teacher: str | None = None
    weights: str | None = field(default=None, metadata=PATH)  # openclip: the local weights file (.pt/.bin/.safetensors)
    openclip_config: str | None = field(default=None, metadata=PATH)  # openclip: a model config JSON to register (stem = name)
    precision: Literal["fp32", "bf16"] = "fp32"  # the teacher's weights and compute
    # Teacher features per sample key (and per caption's tokens) written here, so a multi-epoch
    # run encodes each sample once. The teacher then sees a deterministic centre crop. Refused
    # when it was written for other teacher weights or another transform.
    cache_dir: str | None = None


@dataclass
class ViewsConfig:
    """The two augmented views of each image for the self-supervised objectives (SimCLR's recipe).

    Per-view settings are lists of two values (view 1, view 2). Their defaults depend on the
    run: SimCLR's symmetric views, or BYOL's asymmetric ones when `byol` is an objective.
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    flip_p: float = 0.5  # horizontal flip probability
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2  # probability of converting to grey
    blur_p: list[float] | None = None  # Gaussian blur probability per view; None = [0.5, 0.5], BYOL [1.0, 0.1]
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # blur sigma range (pixels); kernel = 10% of the side
    solarize_p: list[float] | None = None  # solarize probability per view; None = [0, 0], BYOL [0, 0.2]


@dataclass
class SimCLRConfig:
    """SimCLR: an MLP projector on the pooled image-tower features and NT-Xent over 2N views."""

    temperature: float | None = None  # NT-Xent temperature; None = 0.1 beside clip/siglip (SLIP), 0.2 alone
    hidden_dim: int = 2048  # projector hidden width
    out_dim: int = 128  # projector output width
    num_layers: int = 2  # projector depth (SimCLR 2, SLIP 3)


@dataclass
class BYOLConfig:
    """BYOL: online tower + projector + predictor, EMA target tower + projector."""

    base_momentum: float = 0.99  # target EMA momentum at the first step (BYOL: 0.996 for long runs)
    final_momentum: float = 1.0  # momentum at the last step; cosine schedule in between
    hidden_dim: int = 4096  # projector and predictor hidden width
    out_dim: int = 256  # projector and predictor output width


@dataclass
class MoCoConfig:
    """MoCo: query encoder (tower + projector [+ predictor]) vs an EMA key encoder, InfoNCE against a queue."""

    temperature: float = 0.2  # InfoNCE temperature (MoCo v2 0.2)
    queue_size: int = 65536  # past keys used as negatives; 0 = MoCo v3 (the keys of the global batch)
    predictor: bool = False  # MoCo v3's predictor MLP on the query side
    hidden_dim: int = 2048  # projector (and predictor) hidden width
    out_dim: int = 128  # key dimension
    num_layers: int = 2  # projector depth (MoCo v2 2, v3 3)
    base_momentum: float = 0.99  # key encoder EMA momentum at the first step (MoCo v2: 0.999 constant) ...
    final_momentum: float = 1.0  # ... cosine to this at the last step
    shuffle_bn: bool = True  # shuffle the key batch across ranks so BatchNorm statistics cannot leak the positive


@dataclass
class SimSiamConfig:
    """SimSiam: projector + predictor, negative cosine against the stop-gradient projection of the other view."""

    hidden_dim: int = 2048  # projector hidden width
    out_dim: int = 2048  # projector output width
    num_layers: int = 3  # projector depth (SimSiam 3)
    predictor_hidden_dim: int = 512  # predictor bottleneck width (SimSiam: out_dim / 4)


@dataclass
class TripletConfig:
    """Triplet margin loss with negatives mined from the global batch (all ranks)."""

    pairs: Literal["views", "image_text"] = "views"  # two views of an image, or an image and its caption
    margin: float = 0.2  # on the cosine distance 1 - cos
    mining: Literal["batch_hard", "semi_hard"] = "semi_hard"  # hardest negative, or FaceNet's semi-hard one
    symmetric: bool = True  # also mine with the positives as anchors
    hidden_dim: int = 2048  # projector of the views (pairs: views)
    out_dim: int = 128


@dataclass
class SSLConfig:
    """Settings of the self-supervised objectives (used when `objectives` names them)."""

    views: ViewsConfig = field(default_factory=ViewsConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    triplet: TripletConfig = field(default_factory=TripletConfig)
    # BatchNorm in the SSL heads over the global batch (all ranks), as the recipes do; off:
    # each rank's own batch. Costs two small all-reduces per BatchNorm layer and step.
    sync_batchnorm: bool = False


@dataclass
class DataConfig:
    """WebDataset input. Shard patterns use brace expansion; several sources join with `::`."""

    train_shards: str | None = None  # e.g. "data/{00000..00127}.tar::other/{0..9}.tar"
    train_weights: list[float] | None = None  # sampling weight per `::` source (resampled mode)
    resampled: bool = False  # draw shards with replacement forever (epoch = samples_per_epoch)
    samples_per_epoch: int | None = None  # epoch length in resampled mode
    shuffle_buffer: int = 1000  # samples held for shuffling (0 = no sample shuffle)
    num_workers: int = 2  # DataLoader worker processes per rank
    image_size: int = 224  # side of the square crops fed to the image tower
    image_mean: list[float] | None = None  # normalisation; None = the image tower's processor or CLIP's
    image_std: list[float] | None = None
    train_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop scale range
    max_pixels: int = 89_478_485  # images above this are skipped (decompression bombs)
    val_shards: str | None = None  # held-out image-caption shards (retrieval)


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a schedule."""

    lr: float = 5e-4  # peak learning rate of the projections, logit scale and fresh towers
    image_lr: float | None = None  # image tower's learning rate (None = lr); pretrained towers often want less
    text_lr: float | None = None  # text tower's learning rate (None = lr)
    weight_decay: float = 0.2  # not applied to biases, norms, embeddings' position tables, logit scale/bias
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    schedule: Literal["cosine", "constant_cooldown", "constant"] = "cosine"  # all with linear warmup
    warmup_steps: int = 0
    cooldown_steps: int = 0  # constant_cooldown: linear decay to min_lr over the last N steps
    min_lr_ratio: float = 0.0  # floor of the schedule, as a fraction of each group's peak
    grad_clip: float | None = 1.0  # max global gradient norm (None = no clipping)


@dataclass
class TrainConfig:
    """Batch sizes, length, precision, and how often to log, evaluate and save."""

    micro_batch_size: int = 32  # samples per rank per forward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # optional check: must equal micro * accum * world size
    accumulation: Literal["feature_cache", "plain"] = "feature_cache"  # contrastive accumulation method
    steps: int | None = None  # optimizer steps to train (None = epochs * steps per epoch)
    epochs: int = 1  # used when steps is None
    precision: Literal["fp32", "bf16", "fp16"] | None = None  # None: as the DeepSpeed JSON says (fp32 if silent)
    log_every: int = 10  # steps between log lines / monitor events
    eval_every: int | None = None  # steps between evaluations (None = only at the end)
    checkpoint_every: int | None = None  # steps between checkpoints (None = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: str | None = None  # "latest" or a checkpoint directory (any world size / workers / micro batch)
    allow_batch_change: bool = False  # resume with another global batch: remaining steps re-derived from remaining samples
    zero_stage: int | None = None  # ZeRO stage when no --deepspeed_config is given (default 2)
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    patch_dropout_final_steps: int = 0  # train the last N steps with every patch token (FLIP's unmasked tuning)
    # torch.compile the towers (inductor; the CPU needs a C++ compiler). The first steps include
    # the compilation. Not with ZeRO stage 3 (refused at start-up).
    compile: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training."""

    zeroshot_shards: str | None = None  # shards with .cls labels
    classnames: str | None = field(default=None, metadata=PATH)  # one class name per line
    templates: str | None = field(default=None, metadata=PATH)  # JSON list of templates with {}
    retrieval_shards: str | None = None  # shards with captions
    knn_train_shards: str | None = None  # labelled (.cls) shards whose image features are the kNN neighbours
    knn_test_shards: str | None = None  # labelled shards classified by kNN (and the linear probe)
    knn_k: int = 20  # neighbours that vote
    knn_temperature: float = 0.07  # vote weight exp(cos / T)
    linear_probe: bool = False  # also fit a logistic-regression probe on the kNN train features
    batch_size: int = 256


@dataclass
class PushConfig:
    """Upload the exported model to the Hugging Face Hub at the end of training (rank 0)."""

    repo_id: str  # "org/name"
    private: bool = False
    revision: str | None = None  # branch; None = main
    commit_message: str | None = None
    allow_inexact: bool = False  # push even when plain transformers cannot reproduce a side (see `mmcl push --allow-inexact`)


@dataclass
class RunConfig:
    """A whole run. Only `model` is required."""

    model: ModelConfig
    objectives: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})  # weighted sum: clip, siglip, simclr, byol
    loss: LossConfig = field(default_factory=LossConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)  # simclr / byol settings
    distill: DistillConfig = field(default_factory=DistillConfig)  # the distill objective's teacher
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    push_to_hub: PushConfig | None = None  # export + upload when training ends
    output_dir: str = "runs/default"  # checkpoints, logs and the resolved config go here
    seed: int = 0  # seeds model init, data order and augmentation


KNOWN_OBJECTIVES = ("clip", "siglip", "clip_queue", "simclr", "byol", "moco", "simsiam", "triplet", "distill")
CONTRASTIVE_OBJECTIVES = ("clip", "siglip", "clip_queue", "distill")  # image-text objectives: need the text tower
SSL_OBJECTIVES = ("simclr", "byol", "moco", "simsiam", "triplet")  # image objectives on two augmented views


def uses_text(config: RunConfig) -> bool:
    """Whether an objective needs the text tower (clip/siglip/clip_queue/distill, or triplet on image-text pairs)."""
    return any(name in CONTRASTIVE_OBJECTIVES for name in config.objectives) or (
        "triplet" in config.objectives and config.ssl.triplet.pairs == "image_text")


def uses_views(config: RunConfig) -> bool:
    """Whether an objective needs the two augmented views of each image."""
    return any(name in SSL_OBJECTIVES for name in config.objectives) and not (
        set(config.objectives) & set(SSL_OBJECTIVES) == {"triplet"} and config.ssl.triplet.pairs == "image_text")

# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides and validate it.

    Relative paths inside the file are resolved against the current working directory
    (the way `deepspeed train.py` users run it from the repo root).
    """
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"config file {source} does not exist.")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({str(error).splitlines()[0]}).") from error
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
    config = _build(RunConfig, _expand_init_from(raw, source), key="", source=source)
    _check_semantics(config, source)
    return config


def _read_json_file(folder_or_hub_id: str, filename: str) -> dict[str, Any] | None:
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


def _expand_init_from(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """With `model.init_from: SOURCE` (a CLIPModel), fill the keys it decides where the config leaves them unset."""
    model = raw.get("model") if isinstance(raw, dict) else None
    init_from = model.get("init_from") if isinstance(model, dict) else None
    if not isinstance(init_from, str):
        return raw  # absent, or a type error _build reports
    _check_path(init_from, "model.init_from", source, hub_id_allowed=True)
    clip = _read_json_file(init_from, "config.json")
    if clip is None and not Path(init_from).expanduser().exists():
        clip = {"model_type": "clip"}  # a hub id not reachable now (offline): the towers' loading reports it
    if clip is None or clip.get("model_type") != "clip":
        what = "has no readable config.json" if clip is None else f"is a '{clip.get('model_type')}' model"
        raise ConfigError(f"{source}: 'model.init_from' = '{init_from}' {what}; it must be a transformers CLIPModel "
                          "folder or hub id (e.g. written by `mmcl convert openclip`).")
    raw = copy.deepcopy(raw)
    model = raw["model"]
    sides = ["image"] + (["text"] if model.get("text", {}) is not None else [])
    for kind in sides:
        tower = model.setdefault(kind, {})
        if isinstance(tower, dict) and "name_or_path" not in tower and "config" not in tower:
            tower["name_or_path"] = init_from
    text_config, vision_config = clip.get("text_config") or {}, clip.get("vision_config") or {}
    if isinstance(model.get("text"), dict) and "max_position_embeddings" in text_config:
        model["text"].setdefault("context_length", text_config["max_position_embeddings"])
    if "projection_dim" in clip:
        model.setdefault("embed_dim", clip["projection_dim"])
    data = raw.setdefault("data", {})
    if isinstance(data, dict):
        if "image_size" in vision_config:
            data.setdefault("image_size", vision_config["image_size"])
        processor = _read_json_file(init_from, "preprocessor_config.json") or {}
        for key in ("image_mean", "image_std"):
            if key in processor:
                data.setdefault(key, processor[key])
    return raw


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
    """Write the resolved config as YAML; `load_config(path)` returns an equal object."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _build(cls: type, raw: Any, key: str, source: str) -> Any:
    """Validate `raw` against dataclass `cls` and construct it (recursively)."""
    where = key or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {_describe(raw)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            suggestion = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" — did you mean '{_join(key, suggestion[0])}'?" if suggestion else f" (known keys: {', '.join(fields)})."
            raise ConfigError(f"{source}: unknown key '{_join(key, str(name))}'{hint}")
    values = {}
    for name, spec in fields.items():
        sub_key = _join(key, name)
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{sub_key}'.")
            continue
        value = _coerce(raw[name], hints[name], sub_key, source)
        if value is not None and (spec.metadata.get("path") or spec.metadata.get("model_path")):
            _check_path(value, sub_key, source, hub_id_allowed=bool(spec.metadata.get("model_path")))
        values[name] = value
    return cls(**values)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(value, candidate, key, source)
            except ConfigError as error:
                errors.append(error)
        if len(candidates) == 1:
            raise errors[0]
        raise ConfigError(f"{source}: '{key}' must be {' or '.join(_type_name(a) for a in args)}, got {_describe(value)}.")
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, source)
    if origin is Literal:
        if value not in args:
            suggestion = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" — did you mean '{suggestion[0]}'?" if suggestion else "."
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {_describe(value)}.")
        key_type, value_type = args or (Any, Any)
        return {
            _coerce(k, key_type, f"{key} (key {k!r})", source): _coerce(v, value_type, _join(key, str(k)), source)
            for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {_describe(value)}.")
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {_describe(value)}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {_describe(value)}.")
        return value
    if annotation is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {_describe(value)}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {_describe(value)}.")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {annotation!r}")  # a bug in this file


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _check_path(value: str, key: str, source: str, hub_id_allowed: bool) -> None:
    """A local path must exist; with `hub_id_allowed`, `org/name` or `name` may be a hub id instead."""
    if Path(value).expanduser().exists():
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value
    if hub_id_allowed and not looks_local and _HUB_ID.match(value):
        return
    raise ConfigError(f"{source}: '{key}' points to '{value}', which does not exist.")


def _check_semantics(config: RunConfig, source: str) -> None:
    """Rules that span several keys."""
    towers = [("model.image", config.model.image)]
    if config.model.text is not None:
        towers.append(("model.text", config.model.text))
    for key, tower in towers:
        if (tower.name_or_path is None) == (tower.config is None):
            raise ConfigError(f"{source}: '{key}' needs exactly one of 'name_or_path' (pretrained) or 'config' (random init).")
        if tower.config is not None and "model_type" not in tower.config:
            raise ConfigError(f"{source}: '{key}.config' needs a 'model_type' (e.g. vit, bert, clip_vision_model).")
        if tower.unlocked_layers < 0:
            raise ConfigError(f"{source}: '{key}.unlocked_layers' must be >= 0, got {tower.unlocked_layers}.")
        if tower.unlocked_layers and not tower.lock:
            raise ConfigError(f"{source}: '{key}.unlocked_layers' only applies with '{key}.lock: true'.")
        if not 0.0 <= tower.patch_dropout < 1.0:
            raise ConfigError(f"{source}: '{key}.patch_dropout' must be in [0, 1), got {tower.patch_dropout}.")
        if tower.patch_dropout and tower.lock and not tower.unlocked_layers:
            raise ConfigError(f"{source}: '{key}.patch_dropout' has no effect on a fully locked tower (it stays in eval "
                              "mode); set it to 0 or set 'unlocked_layers'.")
        if key == "model.text" and tower.patch_dropout:
            raise ConfigError(f"{source}: 'model.text.patch_dropout' applies to image towers only; remove it.")
    text = config.model.text
    if text is not None and text.tokenizer is None and text.name_or_path is None:
        raise ConfigError(f"{source}: 'model.text.tokenizer' is required when the text tower is built from an inline config.")
    if text is not None and text.context_length < 1:
        raise ConfigError(f"{source}: 'model.text.context_length' must be >= 1, got {text.context_length}.")
    if config.train.patch_dropout_final_steps < 0:
        raise ConfigError(f"{source}: 'train.patch_dropout_final_steps' must be >= 0, got {config.train.patch_dropout_final_steps}.")
    if config.model.embed_dim < 1:
        raise ConfigError(f"{source}: 'model.embed_dim' must be >= 1, got {config.model.embed_dim}.")
    if config.model.logit_scale_init <= 0 or config.model.logit_scale_max < config.model.logit_scale_init:
        raise ConfigError(f"{source}: 'model.logit_scale_init' must be positive and at most 'model.logit_scale_max'.")
    if not config.objectives:
        raise ConfigError(f"{source}: 'objectives' must name at least one objective (e.g. clip: 1.0).")
    for name, weight in config.objectives.items():
        if name not in KNOWN_OBJECTIVES:
            suggestion = difflib.get_close_matches(name, KNOWN_OBJECTIVES, n=1)
            hint = f" — did you mean '{suggestion[0]}'?" if suggestion else f" (known: {', '.join(KNOWN_OBJECTIVES)})."
            raise ConfigError(f"{source}: unknown objective 'objectives.{name}'{hint}")
        if weight < 0:
            raise ConfigError(f"{source}: 'objectives.{name}' weight must be >= 0, got {weight}.")
        if name in CONTRASTIVE_OBJECTIVES and config.model.text is None:
            raise ConfigError(f"{source}: objective '{name}' needs a text tower ('model.text').")
    if "triplet" in config.objectives and config.ssl.triplet.pairs == "image_text" and config.model.text is None:
        raise ConfigError(f"{source}: 'ssl.triplet.pairs: image_text' needs a text tower ('model.text').")
    if not uses_text(config):
        _check_image_only(config, source)
    _check_ssl(config, source)
    if "siglip" in config.objectives and config.model.logit_bias_init is None:
        raise ConfigError(f"{source}: objective 'siglip' needs 'model.logit_bias_init' (SigLIP uses -10).")
    if isinstance(config.loss.chunk_size, int) and config.loss.chunk_size < 1:
        raise ConfigError(f"{source}: 'loss.chunk_size' must be >= 1, got {config.loss.chunk_size}.")
    if "clip_queue" in config.objectives and isinstance(config.loss.chunk_size, int):
        raise ConfigError(f"{source}: objective 'clip_queue' computes its loss densely; remove 'loss.chunk_size'.")
    if len(set(config.objectives) & {"clip", "siglip", "clip_queue"}) > 1 and "clip_queue" in config.objectives:
        raise ConfigError(f"{source}: 'clip_queue' already is CLIP's loss (with extra negatives); use it instead of clip/siglip.")
    _check_distill(config, source)
    data = config.data
    if data.resampled and data.samples_per_epoch is None and data.train_shards is not None:
        raise ConfigError(f"{source}: 'data.samples_per_epoch' is required with 'data.resampled: true'.")
    if data.train_weights is not None and data.train_shards is not None:
        sources = data.train_shards.count("::") + 1
        if len(data.train_weights) != sources:
            raise ConfigError(
                f"{source}: 'data.train_weights' has {len(data.train_weights)} weights for {sources} '::'-joined sources."
            )
    if len(data.train_crop_scale) != 2 or not 0 < data.train_crop_scale[0] <= data.train_crop_scale[1] <= 1:
        raise ConfigError(f"{source}: 'data.train_crop_scale' must be [min, max] with 0 < min <= max <= 1.")
    for name in ("image_mean", "image_std"):
        values = getattr(data, name)
        if values is not None and len(values) != 3:
            raise ConfigError(f"{source}: 'data.{name}' must have 3 values (R, G, B), got {len(values)}.")


def _check_distill(config: RunConfig, source: str) -> None:
    """The distill objective needs a teacher; distill.* keys without it are a mistake."""
    settings = config.distill
    if "distill" not in config.objectives:
        if settings.teacher is not None:
            raise ConfigError(f"{source}: 'distill.teacher' is set but 'objectives' has no 'distill'; add distill: 1.0 to it.")
        return
    teacher = settings.teacher
    if teacher is None:
        raise ConfigError(f"{source}: objective 'distill' needs 'distill.teacher' (openclip:<architecture>, hf-hub:<id> "
                          "or a transformers / mmcl model directory).")
    if teacher.startswith("openclip:"):
        if not teacher[len("openclip:"):]:
            raise ConfigError(f"{source}: 'distill.teacher' must name the architecture after 'openclip:', e.g. openclip:ViT-B-32.")
        if settings.weights is None:
            raise ConfigError(f"{source}: 'distill.teacher: {teacher}' needs 'distill.weights', the local weights file "
                              "(a random teacher teaches nothing).")
    elif teacher.startswith("hf-hub:"):
        if settings.weights is not None or settings.openclip_config is not None:
            raise ConfigError(f"{source}: 'distill.weights' / 'distill.openclip_config' only apply to openclip:<architecture> teachers.")
    else:
        if not Path(teacher).expanduser().is_dir():
            raise ConfigError(f"{source}: 'distill.teacher' points to '{teacher}', which is not a directory; use a transformers "
                              "or mmcl model directory, openclip:<architecture> or hf-hub:<id>.")
        if settings.weights is not None or settings.openclip_config is not None:
            raise ConfigError(f"{source}: 'distill.weights' / 'distill.openclip_config' only apply to openclip:<architecture> teachers.")


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


def _check_ssl(config: RunConfig, source: str) -> None:
    views, simclr, byol = config.ssl.views, config.ssl.simclr, config.ssl.byol
    if len(views.crop_scale) != 2 or not 0 < views.crop_scale[0] <= views.crop_scale[1] <= 1:
        raise ConfigError(f"{source}: 'ssl.views.crop_scale' must be [min, max] with 0 < min <= max <= 1.")
    if len(views.color_jitter) != 4 or any(v < 0 for v in views.color_jitter) or views.color_jitter[3] > 0.5:
        raise ConfigError(f"{source}: 'ssl.views.color_jitter' must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5.")
    if len(views.blur_sigma) != 2 or not 0 < views.blur_sigma[0] <= views.blur_sigma[1]:
        raise ConfigError(f"{source}: 'ssl.views.blur_sigma' must be [min, max] with 0 < min <= max.")
    probabilities = {"flip_p": [views.flip_p], "color_jitter_p": [views.color_jitter_p], "grayscale_p": [views.grayscale_p],
                     "blur_p": views.blur_p or [], "solarize_p": views.solarize_p or []}
    for key, values in probabilities.items():
        if key in ("blur_p", "solarize_p") and values and len(values) != 2:
            raise ConfigError(f"{source}: 'ssl.views.{key}' must have 2 values (view 1, view 2), got {len(values)}.")
        if any(not 0 <= v <= 1 for v in values):
            raise ConfigError(f"{source}: 'ssl.views.{key}' must be probabilities in [0, 1], got {values}.")
    if simclr.temperature is not None and simclr.temperature <= 0:
        raise ConfigError(f"{source}: 'ssl.simclr.temperature' must be positive, got {simclr.temperature}.")
    moco, simsiam, triplet, queue = config.ssl.moco, config.ssl.simsiam, config.ssl.triplet, config.loss.clip_queue
    positive_ints = {"ssl.simclr.hidden_dim": simclr.hidden_dim, "ssl.simclr.out_dim": simclr.out_dim,
                     "ssl.simclr.num_layers": simclr.num_layers, "ssl.byol.hidden_dim": byol.hidden_dim,
                     "ssl.byol.out_dim": byol.out_dim, "ssl.moco.hidden_dim": moco.hidden_dim,
                     "ssl.moco.out_dim": moco.out_dim, "ssl.moco.num_layers": moco.num_layers,
                     "ssl.simsiam.hidden_dim": simsiam.hidden_dim, "ssl.simsiam.out_dim": simsiam.out_dim,
                     "ssl.simsiam.num_layers": simsiam.num_layers,
                     "ssl.simsiam.predictor_hidden_dim": simsiam.predictor_hidden_dim,
                     "ssl.triplet.hidden_dim": triplet.hidden_dim, "ssl.triplet.out_dim": triplet.out_dim,
                     "loss.clip_queue.size": queue.size, "eval.knn_k": config.eval.knn_k}
    for key, value in positive_ints.items():
        if value < 1:
            raise ConfigError(f"{source}: '{key}' must be >= 1, got {value}.")
    if moco.queue_size < 0:
        raise ConfigError(f"{source}: 'ssl.moco.queue_size' must be >= 0 (0 = MoCo v3, no queue), got {moco.queue_size}.")
    if not 0 <= queue.distill <= 1:
        raise ConfigError(f"{source}: 'loss.clip_queue.distill' must be in [0, 1], got {queue.distill}.")
    if moco.temperature <= 0:
        raise ConfigError(f"{source}: 'ssl.moco.temperature' must be positive, got {moco.temperature}.")
    if triplet.margin < 0:
        raise ConfigError(f"{source}: 'ssl.triplet.margin' must be >= 0, got {triplet.margin}.")
    for prefix, settings in (("ssl.byol", byol), ("ssl.moco", moco), ("loss.clip_queue", queue)):
        if not 0 <= settings.base_momentum <= settings.final_momentum <= 1:
            raise ConfigError(
                f"{source}: '{prefix}.base_momentum' and '{prefix}.final_momentum' must satisfy 0 <= base <= final <= 1, "
                f"got {settings.base_momentum} and {settings.final_momentum}."
            )
    if config.ssl.sync_batchnorm and "moco" in config.objectives and moco.shuffle_bn:
        raise ConfigError(f"{source}: 'ssl.sync_batchnorm' makes 'ssl.moco.shuffle_bn' pointless (the statistics are "
                          "global either way); set ssl.moco.shuffle_bn: false.")
    knn = (config.eval.knn_train_shards, config.eval.knn_test_shards)
    if (knn[0] is None) != (knn[1] is None):
        raise ConfigError(f"{source}: 'eval.knn_train_shards' and 'eval.knn_test_shards' go together; set both or neither.")
    if config.eval.linear_probe and knn[0] is None:
        raise ConfigError(f"{source}: 'eval.linear_probe' needs 'eval.knn_train_shards' and 'eval.knn_test_shards'.")
    if config.eval.knn_temperature <= 0:
        raise ConfigError(f"{source}: 'eval.knn_temperature' must be positive, got {config.eval.knn_temperature}.")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    if typing.get_origin(annotation) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(annotation, str(annotation))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"
