"""distill: the student's image-text logits follow a frozen teacher's softmax (OpenCLIP's DistillClipLoss).

The teacher (`mmcl.engine.teacher`) encodes its own inputs of the batch — `teacher_pixel_values`
(the same decoded image at its size and normalisation) and `teacher_input_ids` /
`teacher_attention_mask` (the caption through its tokenizer) — without gradient, inside the
task's `encode` (`batch_outputs`), so its features travel with the student's: feature-cache
accumulation concatenates them over the micro-batches and the loss sees the teacher's logits
over the whole accumulated global batch. The loss is `mmcl.losses.DistillLoss`.

The teacher is a plain attribute, hidden from DeepSpeed (no optimizer state, no ZeRO, no
checkpoint). `extra_state` holds only its weights' SHA-256, so resume refuses other weights.
With `distill.cache_dir` the features come from `TeacherFeatureCache` where it has them; after
each optimizer step the ranks share their new entries (`after_step`), and `encoded_images`
(logged) counts the images the teacher encoded in the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mmcl.coerce import PATH, ConfigError
from mmcl.engine.objectives.base import Objective
from mmcl.engine.teacher import Teacher, TeacherInputs, TeacherLoadError, load_teacher
from mmcl.engine.teacher_cache import TeacherFeatureCache, token_key
from mmcl.losses import DistillLoss
from mmcl.models import DualEncoder, Gather, no_gather

if TYPE_CHECKING:
    from mmcl.config import RunConfig


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

    def validate(self, key: str, source: str) -> None:
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


TEACHER_KEYS = ("teacher_image_features", "teacher_text_features")
FLUSH_EVERY = 50  # optimizer steps between writes of new cache entries


def teacher_transform(cfg: RunConfig, inputs: TeacherInputs):
    """The teacher's image transform: the student's random crop box at the teacher's size, or a
    deterministic centre crop when features are cached (one view per sample key)."""
    from mmcl.data.transforms import clip_eval_transform, clip_train_transform

    if cfg.distill.cache_dir is not None:
        return clip_eval_transform(inputs.image_size)
    return clip_train_transform(inputs.image_size, cfg.data.train_crop_scale)


def cache_fingerprint(cfg: RunConfig, teacher: Teacher) -> dict:
    """What the cached features depend on: weights, precision, image transform and normalisation, tokenizer."""
    inputs = teacher.inputs()
    return {"teacher_sha256": teacher.sha256, "precision": cfg.distill.precision,
            "transform": repr(teacher_transform(cfg, inputs)), "mean": list(inputs.mean), "std": list(inputs.std),
            "tokenizer": type(inputs.tokenizer).__name__, "context_length": inputs.context_length}


class DistillObjective(Objective):
    """forward -> {"loss", "i2t_agree", "t2i_agree"} (see `mmcl.losses.DistillLoss`)."""

    name = "distill"
    settings = DistillConfig
    settings_key = "distill"
    needs = frozenset({"pixel_values", "text", "teacher"})
    cacheable = True
    image_text = True
    state = "frozen teacher (only its SHA-256 is saved)"

    @classmethod
    def check(cls, cfg: RunConfig, source: str) -> None:
        if cls.name not in cfg.objectives:
            if cfg.distill.teacher is not None:
                raise ConfigError(f"{source}: 'distill.teacher' is set but 'objectives' has no 'distill'; add distill: 1.0 to it.")
        elif cfg.distill.teacher is None:
            raise ConfigError(f"{source}: objective 'distill' needs 'distill.teacher' (openclip:<architecture>, hf-hub:<id> "
                              "or a transformers / mmcl model directory).")

    def __init__(self, teacher: Teacher, cache: TeacherFeatureCache | None = None):
        super().__init__()
        self.loss = DistillLoss()
        # Plain attributes, not submodules: hidden from DeepSpeed.
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "cache", cache)
        self.encoded_images = 0  # images this rank's teacher encoded since the last optimizer step

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        if cfg is None or cfg.distill.teacher is None:
            raise TeacherLoadError("the distill objective needs distill.teacher.")
        teacher = load_teacher(cfg.distill)
        cache = None
        if cfg.distill.cache_dir is not None:
            import os

            cache = TeacherFeatureCache(cfg.distill.cache_dir, cache_fingerprint(cfg, teacher),
                                        int(os.environ.get("RANK", "0")))
        return cls(teacher, cache)

    # ------------------------------------------------------------------ the teacher's pass

    def batch_outputs(self, batch: dict) -> dict[str, Tensor]:
        """The teacher's normalised features of the batch [B, D_t] (float32, no gradient) and its scale."""
        pixels = batch["teacher_pixel_values"]
        if self.teacher.device != pixels.device:
            self.teacher.to(pixels.device)
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        if self.cache is None:
            image = self.teacher.encode_image(pixels)
            text = self.teacher.encode_text(ids, mask)
        else:
            def encode_images(rows: Tensor) -> Tensor:
                self.encoded_images += len(rows)
                return self.teacher.encode_image(pixels[rows])

            image = self._cached(self.cache.images, self.cache.add_images, list(batch["keys"]), encode_images)
            text = self._cached(self.cache.texts, self.cache.add_texts, [token_key(row) for row in ids],
                                lambda rows: self.teacher.encode_text(ids[rows], mask[rows]))
        scale = torch.tensor(self.teacher.logit_scale, dtype=torch.float32, device=pixels.device)
        return {"teacher_image_features": image, "teacher_text_features": text, "teacher_logit_scale": scale}

    def _cached(self, lookup, add, keys: list[str], encode) -> Tensor:
        """Rows from the cache where it has them; the rest encoded (in one call) and added."""
        found = lookup(keys)
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            encoded = encode(torch.tensor(missing, dtype=torch.long))
            add([keys[i] for i in missing], encoded)
            for i, row in zip(missing, encoded):
                found[i] = row
        device = self.teacher.device
        return torch.stack([row.to(device) for row in found]).float()

    # ------------------------------------------------------------------ the loss

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        return self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                         outputs["teacher_image_features"], outputs["teacher_text_features"],
                         outputs["teacher_logit_scale"], outputs.get("logit_bias"))

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        if self.cache is None:
            return {}
        self.cache.share()  # every rank, every step: no rank re-encodes what another one did
        if step % FLUSH_EVERY == 0 or step == total_steps:
            self.cache.flush()
        looked_up = max(1, self.cache.hits + self.cache.misses)
        encoded, self.encoded_images = self.encoded_images, 0
        return {"cache_hit_rate": self.cache.hits / looked_up, "encoded_images": float(encoded)}

    def extra_state(self) -> dict[str, Tensor]:
        if self.cache is not None:
            self.cache.flush()  # the checkpoint's cache entries are on disk with it
        return {"teacher_sha256": torch.tensor(list(bytes.fromhex(self.teacher.sha256)), dtype=torch.uint8)}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        saved = state.get("teacher_sha256")
        if saved is None:
            raise ValueError("the checkpoint has no distill teacher fingerprint; it was not trained with distill.")
        saved_hex = bytes(saved.tolist()).hex()
        if saved_hex != self.teacher.sha256:
            raise TeacherLoadError(
                f"distill.teacher '{self.teacher.name}' is not the teacher this run was trained with (weights SHA-256 "
                f"{self.teacher.sha256[:12]}..., the checkpoint's {saved_hex[:12]}...); resume with the same teacher.")
