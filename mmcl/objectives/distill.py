"""distill: the student's image-text logits follow a frozen teacher's softmax (OpenCLIP's DistillClipLoss).

The teacher (`mmcl.objectives.teacher`) encodes its own inputs of the batch — `teacher_pixel_values`
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

With `distill.store` (a reinforced store, `mmcl.data.reinforced`) no teacher exists: the batch
carries each teacher's stored features of the crop the student sees (`teacher_image_features_<t>`,
`teacher_text_features_<t>`), `batch_outputs` passes them on (re-normalised in float32) with
each teacher's stored logit scale, so they travel through feature-cache accumulation and the
loss's all-gather exactly as the online teacher's do, and the loss is MobileCLIP's ensemble:
`DistillLoss` averaged over the teachers. `extra_state` then holds the store's fingerprint
(`reinforced.store_fingerprint`: teachers, augmentations, their seed and scale).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.losses import DistillLoss
from mmcl.models import DualEncoder, Gather, no_gather
from mmcl.objectives.base import Objective
from mmcl.objectives.teacher import Teacher, TeacherInputs, TeacherLoadError, load_teacher
from mmcl.objectives.teacher_cache import TeacherFeatureCache, token_key

if TYPE_CHECKING:
    from mmcl.config import RunConfig


TEACHER_KEYS = ("teacher_image_features", "teacher_text_features")
FLUSH_EVERY = 50  # optimizer steps between writes of new cache entries


def teacher_transform(cfg: RunConfig, inputs: TeacherInputs):
    """The teacher's image transform: the student's random crop box at the teacher's size, or a
    deterministic centre crop when features are cached (one view per sample key)."""
    from mmcl.data.transforms import clip_eval_transform, clip_train_transform
    from mmcl.objectives.teacher import naflex_transform

    if inputs.naflex is not None:  # deterministic: the teacher's own NaFlex patches of the whole image
        return naflex_transform(inputs)
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

    def __init__(self, teacher: Teacher | None, cache: TeacherFeatureCache | None = None, store: dict | None = None):
        super().__init__()
        self.loss = DistillLoss()
        # Plain attributes, not submodules: hidden from DeepSpeed.
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "cache", cache)
        self.store = store  # a reinforced store's manifest (distill.store), instead of a teacher
        self.store_scales = [float(t["logit_scale"]) for t in store["teachers"]] if store is not None else []
        self.encoded_images = 0  # images this rank's teacher encoded since the last optimizer step

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        if cfg is not None and cfg.distill.store is not None:
            from mmcl.data.reinforced import read_manifest

            return cls(None, store=read_manifest(cfg.distill.store))
        if cfg is None or cfg.distill.teacher is None:
            raise TeacherLoadError("the distill objective needs distill.teacher or distill.store.")
        teacher = load_teacher(cfg.distill)
        cache = None
        if cfg.distill.cache_dir is not None:
            import os

            cache = TeacherFeatureCache(cfg.distill.cache_dir, cache_fingerprint(cfg, teacher),
                                        int(os.environ.get("RANK", "0")))
        return cls(teacher, cache)

    # ------------------------------------------------------------------ the teacher's pass

    def batch_outputs(self, batch: dict) -> dict[str, Tensor]:
        """The teacher's normalised features of the batch [B, D_t] (float32, no gradient) and its scale;
        with a store, each teacher t's stored ones and scale (keys suffixed `_<t>`)."""
        if self.store is not None:
            return self._stored_outputs(batch)
        pixels = batch["teacher_pixel_values"]
        if self.teacher.device != pixels.device:
            self.teacher.to(pixels.device)
        ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
        naflex = {key: batch[f"teacher_{key}"] for key in ("pixel_attention_mask", "spatial_shapes")
                  if f"teacher_{key}" in batch}  # a NaFlex teacher's patch mask and grids (SigLIP 2)
        if self.cache is None:
            image = self.teacher.encode_image(pixels, **naflex)
            text = self.teacher.encode_text(ids, mask)
        else:
            def encode_images(rows: Tensor) -> Tensor:
                self.encoded_images += len(rows)
                return self.teacher.encode_image(pixels[rows], **{key: value[rows] for key, value in naflex.items()})

            image = self._cached(self.cache.images, self.cache.add_images, list(batch["keys"]), encode_images)
            text = self._cached(self.cache.texts, self.cache.add_texts, [token_key(row) for row in ids],
                                lambda rows: self.teacher.encode_text(ids[rows], mask[rows]))
        scale = torch.tensor(self.teacher.logit_scale, dtype=torch.float32, device=pixels.device)
        return {"teacher_image_features": image, "teacher_text_features": text, "teacher_logit_scale": scale}

    def _stored_outputs(self, batch: dict) -> dict[str, Tensor]:
        device = batch["pixel_values"].device
        outputs = {}
        for t, scale in enumerate(self.store_scales):
            for kind in ("image", "text"):
                stored = batch[f"teacher_{kind}_features_{t}"].to(device=device, dtype=torch.float32)
                outputs[f"teacher_{kind}_features_{t}"] = F.normalize(stored, dim=-1)  # unit rows again after float16
            outputs[f"teacher_logit_scale_{t}"] = torch.tensor(scale, dtype=torch.float32, device=device)
        return outputs

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
        if self.store is not None:  # MobileCLIP's ensemble: the term (and its metrics) averaged over the teachers
            terms = [self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                               outputs[f"teacher_image_features_{t}"], outputs[f"teacher_text_features_{t}"],
                               outputs[f"teacher_logit_scale_{t}"], outputs.get("logit_bias"))
                     for t in range(len(self.store_scales))]
            return {name: torch.stack([term[name] for term in terms]).mean() for name in terms[0]}
        return self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                         outputs["teacher_image_features"], outputs["teacher_text_features"],
                         outputs["teacher_logit_scale"], outputs.get("logit_bias"))

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        if self.store is not None:
            return {"encoded_images": 0.0}  # the stored features replace every teacher forward
        if self.cache is None:
            return {}
        self.cache.share()  # every rank, every step: no rank re-encodes what another one did
        if step % FLUSH_EVERY == 0 or step == total_steps:
            self.cache.flush()
        looked_up = max(1, self.cache.hits + self.cache.misses)
        encoded, self.encoded_images = self.encoded_images, 0
        return {"cache_hit_rate": self.cache.hits / looked_up, "encoded_images": float(encoded)}

    def extra_state(self) -> dict[str, Tensor]:
        if self.store is not None:
            return {"store_sha256": _hex_tensor(self._store_sha256())}
        if self.cache is not None:
            self.cache.flush()  # the checkpoint's cache entries are on disk with it
        return {"teacher_sha256": torch.tensor(list(bytes.fromhex(self.teacher.sha256)), dtype=torch.uint8)}

    def _store_sha256(self) -> str:
        from mmcl.data.reinforced import store_fingerprint

        return store_fingerprint(self.store)

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if self.store is not None:
            saved = state.get("store_sha256")
            if saved is None or bytes(saved.tolist()).hex() != self._store_sha256():
                raise TeacherLoadError("distill.store holds other teachers' features than the run was trained with "
                                       "(its fingerprint differs); resume with the same distill.store or distill.teacher.")
            return
        saved = state.get("teacher_sha256")
        if saved is None:
            raise ValueError("the checkpoint has no distill teacher fingerprint; it was not trained with distill.")
        saved_hex = bytes(saved.tolist()).hex()
        if saved_hex != self.teacher.sha256:
            raise TeacherLoadError(
                f"distill.teacher '{self.teacher.name}' is not the teacher this run was trained with (weights SHA-256 "
                f"{self.teacher.sha256[:12]}..., the checkpoint's {saved_hex[:12]}...); resume with the same teacher.")


def _hex_tensor(digest: str) -> Tensor:
    return torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
