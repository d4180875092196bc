"""Each objective's one declaration, torch-free: its name, its settings dataclass and where those
keys live in a run config, what it reads from a batch, whether feature-cache accumulation can
use it, whether it is an image-text objective, its cross-section config rules, and the module
that builds its `nn.Module`.

`mmcl.config` reads these (the run config's sections hold the settings dataclasses, its rules
call `check`) without importing torch; `mmcl.objectives.build_objective` imports the builder
(`mmcl.objectives.<module>`) only when a run builds the objective. The docs (`mmcl.docs`) and
the data pipeline's needs read the same declarations.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmcl.coerce import PATH, ConfigError, count, nonnegative, positive, probability

if TYPE_CHECKING:  # the config reads these declarations, not the other way round
    from mmcl.config import RunConfig


def _no_rules(cfg: RunConfig, source: str) -> None:
    """An objective without cross-section config rules."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective's declaration (see the module docstring)."""

    name: str  # its key in `objectives:`
    builder: str  # "module:Class" of its nn.Module (a subclass of mmcl.objectives.base.Objective)
    needs: frozenset[str]  # what it reads from a batch: "pixel_values", "text", "views", "teacher", "store"
    settings: type | None = None  # its dataclass of config keys
    settings_key: str | None = None  # where those keys live in a run config: "ssl.simclr", "loss.clip_queue", "distill"
    cacheable: bool = False  # the loss can be evaluated on cached (detached) features (feature-cache accumulation)
    image_text: bool = False  # learns from image-caption pairs: needs the text tower, trains the logit scale
    state: str = "-"  # state outside the optimizer, for the docs' table
    check: Callable[[RunConfig, str], None] = _no_rules  # its cross-section config rules (raise ConfigError)
    needs_by_config: Callable[[RunConfig], frozenset[str]] | None = None  # when its settings change `needs`

    def needs_for(self, cfg: RunConfig | None) -> frozenset[str]:
        """What this objective reads from a batch under `cfg`."""
        if cfg is None or self.needs_by_config is None:
            return self.needs
        return self.needs_by_config(cfg)

    def settings_in(self, cfg: RunConfig | None) -> Any:
        """This objective's settings in `cfg` (at `settings_key`), or their defaults when `cfg` is None."""
        if cfg is None:
            return self.settings()
        node: Any = cfg
        for part in self.settings_key.split("."):
            node = getattr(node, part)
        return node


# ----------------------------------------------------------------------------- shared rules


def momentum_field(default: float) -> Any:
    """A momentum-schedule field (`base_momentum`, `final_momentum`): in [0, 1]."""
    return probability(default, note="(0 <= base <= final <= 1)")


def check_momenta(settings: Any, key: str, source: str) -> None:
    """A momentum schedule rises from base_momentum (first step) to final_momentum (last step)."""
    if not settings.base_momentum <= settings.final_momentum:
        raise ConfigError(
            f"{source}: '{key}.base_momentum' and '{key}.final_momentum' must satisfy 0 <= base <= final <= 1, "
            f"got {settings.base_momentum} and {settings.final_momentum}."
        )


# ----------------------------------------------------------------------------- image-text: clip, siglip, clip_queue


def _check_siglip(cfg: RunConfig, source: str) -> None:
    if "siglip" in cfg.objectives and cfg.model.logit_bias_init is None:
        raise ConfigError(f"{source}: objective 'siglip' needs 'model.logit_bias_init' (SigLIP uses -10).")


@dataclass
class ClipQueueConfig:
    """The `clip_queue` objective: CLIP's InfoNCE plus queued negatives from momentum towers (ALBEF-style)."""

    size: int = count(4096)  # queued image and text features (each) used as extra negatives
    base_momentum: float = momentum_field(0.995)  # momentum towers' EMA momentum at the first step (ALBEF: 0.995) ...
    final_momentum: float = momentum_field(1.0)  # ... cosine to this at the last step
    distill: float = probability(0.0)  # ALBEF's momentum distillation: target = distill * momentum softmax + (1 - distill) * one-hot

    def validate(self, key: str, source: str) -> None:
        check_momenta(self, key, source)


def _check_clip_queue(cfg: RunConfig, source: str) -> None:
    if "clip_queue" not in cfg.objectives:
        return
    if isinstance(cfg.loss.chunk_size, int):
        raise ConfigError(f"{source}: objective 'clip_queue' computes its loss densely; remove 'loss.chunk_size'.")
    if set(cfg.objectives) & {"clip", "siglip"}:
        raise ConfigError(f"{source}: 'clip_queue' already is CLIP's loss (with extra negatives); use it instead of clip/siglip.")


CLIP = ObjectiveSpec("clip", "mmcl.objectives.image_text:ClipObjective", frozenset({"pixel_values", "text"}),
                     cacheable=True, image_text=True)
SIGLIP = ObjectiveSpec("siglip", "mmcl.objectives.image_text:SigLipObjective", frozenset({"pixel_values", "text"}),
                       cacheable=True, image_text=True, check=_check_siglip)
CLIP_QUEUE = ObjectiveSpec("clip_queue", "mmcl.objectives.image_text:ClipQueueObjective", frozenset({"pixel_values", "text"}),
                           ClipQueueConfig, "loss.clip_queue", image_text=True, check=_check_clip_queue,
                           state="momentum copy (both towers), image and text queues")

# ----------------------------------------------------------------------------- self-supervised: simclr, byol, moco, simsiam, triplet


@dataclass
class SimCLRConfig:
    """SimCLR: an MLP projector on the pooled image-tower features and NT-Xent over 2N views."""

    temperature: float | None = positive(None)  # NT-Xent temperature; None = 0.1 beside clip/siglip (SLIP), 0.2 alone
    hidden_dim: int = count(2048)  # projector hidden width
    out_dim: int = count(128)  # projector output width
    num_layers: int = count(2)  # projector depth (SimCLR 2, SLIP 3)


def simclr_temperature(cfg: RunConfig | None) -> float:
    """ssl.simclr.temperature, or its default: 0.1 beside an image-text objective (SLIP), 0.2 alone."""
    if cfg is not None and cfg.ssl.simclr.temperature is not None:
        return cfg.ssl.simclr.temperature
    joint = cfg is not None and any(OBJECTIVES[name].image_text for name in cfg.objectives)
    return 0.1 if joint else 0.2


SIMCLR = ObjectiveSpec("simclr", "mmcl.objectives.simclr:SimCLRObjective", frozenset({"views"}), SimCLRConfig, "ssl.simclr")


@dataclass
class BYOLConfig:
    """BYOL: online tower + projector + predictor, EMA target tower + projector."""

    base_momentum: float = momentum_field(0.99)  # target EMA momentum at the first step (BYOL: 0.996 for long runs)
    final_momentum: float = momentum_field(1.0)  # momentum at the last step; cosine schedule in between
    hidden_dim: int = count(4096)  # projector and predictor hidden width
    out_dim: int = count(256)  # projector and predictor output width

    def validate(self, key: str, source: str) -> None:
        check_momenta(self, key, source)


BYOL = ObjectiveSpec("byol", "mmcl.objectives.byol:BYOLObjective", frozenset({"views"}), BYOLConfig, "ssl.byol",
                     state="momentum copy (EMA target: tower + projector)")


@dataclass
class MoCoConfig:
    """MoCo: query encoder (tower + projector [+ predictor]) vs an EMA momentum copy, InfoNCE against a queue."""

    temperature: float = positive(0.2)  # InfoNCE temperature (MoCo v2 0.2)
    queue_size: int = nonnegative(65536, note="(0 = MoCo v3, no queue)")  # past keys used as negatives; 0 = MoCo v3 (the keys of the global batch)
    predictor: bool = False  # MoCo v3's predictor MLP on the query side
    hidden_dim: int = count(2048)  # projector (and predictor) hidden width
    out_dim: int = count(128)  # key dimension
    num_layers: int = count(2)  # projector depth (MoCo v2 2, v3 3)
    base_momentum: float = momentum_field(0.99)  # momentum copy's EMA momentum at the first step (MoCo v2: 0.999 constant) ...
    final_momentum: float = momentum_field(1.0)  # ... cosine to this at the last step
    shuffle_bn: bool = True  # shuffle the key batch across ranks so BatchNorm statistics cannot leak the positive

    def validate(self, key: str, source: str) -> None:
        check_momenta(self, key, source)


def _check_moco(cfg: RunConfig, source: str) -> None:
    if "moco" in cfg.objectives and cfg.ssl.sync_batchnorm and cfg.ssl.moco.shuffle_bn:
        raise ConfigError(f"{source}: 'ssl.sync_batchnorm' makes 'ssl.moco.shuffle_bn' pointless (the statistics are "
                          "global either way); set ssl.moco.shuffle_bn: false.")


MOCO = ObjectiveSpec("moco", "mmcl.objectives.moco:MoCoObjective", frozenset({"views"}), MoCoConfig, "ssl.moco",
                     check=_check_moco, state="momentum copy (the key encoder), key queue")


@dataclass
class SimSiamConfig:
    """SimSiam: projector + predictor, negative cosine against the stop-gradient projection of the other view."""

    hidden_dim: int = count(2048)  # projector hidden width
    out_dim: int = count(2048)  # projector output width
    num_layers: int = count(3)  # projector depth (SimSiam 3)
    predictor_hidden_dim: int = count(512)  # predictor bottleneck width (SimSiam: out_dim / 4)


SIMSIAM = ObjectiveSpec("simsiam", "mmcl.objectives.simsiam:SimSiamObjective", frozenset({"views"}), SimSiamConfig,
                        "ssl.simsiam")


@dataclass
class TripletConfig:
    """Triplet margin loss with negatives mined from the global batch (all ranks)."""

    pairs: Literal["views", "image_text"] = "views"  # two views of an image, or an image and its caption
    margin: float = nonnegative(0.2)  # on the cosine distance 1 - cos
    mining: Literal["batch_hard", "semi_hard"] = "semi_hard"  # hardest negative, or FaceNet's semi-hard one
    symmetric: bool = True  # also mine with the positives as anchors
    hidden_dim: int = count(2048)  # projector of the views (pairs: views)
    out_dim: int = count(128)  # projector output width (pairs: views)


def _triplet_needs(cfg: RunConfig) -> frozenset[str]:
    return frozenset({"pixel_values", "text"}) if cfg.ssl.triplet.pairs == "image_text" else frozenset({"views"})


def _check_triplet(cfg: RunConfig, source: str) -> None:
    if "triplet" in cfg.objectives and cfg.ssl.triplet.pairs == "image_text" and cfg.model.text is None:
        raise ConfigError(f"{source}: 'ssl.triplet.pairs: image_text' needs a text tower ('model.text').")


TRIPLET = ObjectiveSpec("triplet", "mmcl.objectives.triplet:TripletObjective", frozenset({"views"}), TripletConfig,
                        "ssl.triplet", check=_check_triplet, needs_by_config=_triplet_needs)

# ----------------------------------------------------------------------------- distill


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
    # A reinforced store (`mmcl curate reinforce --out DIR`): the teachers' features of K stored
    # crops per sample. Each epoch the student sees one stored crop (replayed exactly) and the
    # loss uses the stored features: no teacher is loaded or run. Excludes teacher and cache_dir.
    store: str | None = field(default=None, metadata=PATH)

    def validate(self, key: str, source: str) -> None:
        if self.store is not None:
            if self.teacher is not None or self.cache_dir is not None:
                raise ConfigError(f"{source}: '{key}.store' replaces the teacher: remove '{key}.teacher' and '{key}.cache_dir' "
                                  "(the stored features are the teachers').")
            check_store_folder(self.store, f"{key}.store", source)
            return
        teacher = self.teacher
        if teacher is None:
            return
        others = self.weights is not None or self.openclip_config is not None
        if teacher.startswith("openclip:"):
            if not teacher[len("openclip:"):]:
                raise ConfigError(f"{source}: '{key}.teacher' must name the architecture after 'openclip:', e.g. openclip:ViT-B-32.")
            if self.weights is None:
                raise ConfigError(f"{source}: '{key}.teacher: {teacher}' needs '{key}.weights', the local weights file "
                                  "(a random teacher teaches nothing).")
            return
        if not teacher.startswith("hf-hub:") and not Path(teacher).expanduser().is_dir():
            raise ConfigError(f"{source}: '{key}.teacher' points to '{teacher}', which is not a directory; use a transformers "
                              "or mmcl model directory, openclip:<architecture> or hf-hub:<id>.")
        if others:
            raise ConfigError(f"{source}: '{key}.weights' / '{key}.openclip_config' only apply to openclip:<architecture> teachers.")


STORE_COMMAND, STORE_VERSION = "reinforce", 1  # what a reinforced store's mmcl_curate.json says


def check_store_folder(store: str, key: str, source: str) -> dict:
    """A reinforced store's manifest (`DIR/mmcl_curate.json`), or ConfigError naming what is wrong."""
    folder = Path(store).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{source}: '{key}' points to '{store}', which is not a directory; write a store with "
                          "mmcl curate reinforce --out DIR and point to DIR.")
    try:
        manifest = json.loads((folder / "mmcl_curate.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("command") != STORE_COMMAND:
        raise ConfigError(f"{source}: '{key}' ('{store}') is not a reinforced store (no mmcl_curate.json written by "
                          "mmcl curate reinforce); write one with mmcl curate reinforce --out DIR.")
    if manifest.get("version") != STORE_VERSION:
        raise ConfigError(f"{source}: '{key}' ('{store}') is a reinforced store of version {manifest.get('version')}, "
                          f"which this mmcl does not read (it reads version {STORE_VERSION}); write it again with this mmcl.")
    return manifest


def _check_distill(cfg: RunConfig, source: str) -> None:
    if "distill" not in cfg.objectives:
        for name in ("teacher", "store"):
            if getattr(cfg.distill, name) is not None:
                raise ConfigError(f"{source}: 'distill.{name}' is set but 'objectives' has no 'distill'; add distill: 1.0 to it.")
    elif cfg.distill.teacher is None and cfg.distill.store is None:
        raise ConfigError(f"{source}: objective 'distill' needs 'distill.teacher' (openclip:<architecture>, hf-hub:<id> "
                          "or a transformers / mmcl model directory) or 'distill.store' (a reinforced store).")
    elif cfg.distill.store is not None and cfg.data.captions_from_labels:
        raise ConfigError(f"{source}: 'distill.store' holds the teachers' features of each sample's own first caption, "
                          "not of class prompts; remove 'data.captions_from_labels' or distil from distill.teacher.")


def _distill_needs(cfg: RunConfig) -> frozenset[str]:
    # With a store the batch carries the stored features ("store") instead of the teacher's inputs.
    return frozenset({"pixel_values", "text", "store" if cfg.distill.store is not None else "teacher"})


DISTILL = ObjectiveSpec("distill", "mmcl.objectives.distill:DistillObjective", frozenset({"pixel_values", "text", "teacher"}),
                        DistillConfig, "distill", cacheable=True, image_text=True, check=_check_distill,
                        state="frozen teacher (only its SHA-256 is saved), or a reinforced store (its fingerprint)",
                        needs_by_config=_distill_needs)

# ----------------------------------------------------------------------------- the registry

# Every objective, in the docs' order. Adding one: its settings and spec above, its nn.Module in
# mmcl/objectives/<name>.py, its loss in mmcl/losses/, its settings' field in mmcl.config.
OBJECTIVES: dict[str, ObjectiveSpec] = {spec.name: spec for spec in (
    CLIP, SIGLIP, CLIP_QUEUE, SIMCLR, BYOL, MOCO, SIMSIAM, TRIPLET, DISTILL,
)}
