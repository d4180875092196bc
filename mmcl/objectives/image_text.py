"""Image-text objectives: clip and siglip (on the model's features), clip_queue (plus queued negatives)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from mmcl.losses import ClipQueueLoss, build_loss
from mmcl.models import DualEncoder, Gather, KeyQueue, MomentumEncoder, no_gather
from mmcl.objectives.base import Objective, split_state

if TYPE_CHECKING:
    from mmcl.config import RunConfig


class ClipObjective(Objective):
    """clip: CLIP's symmetric InfoNCE on the normalised features, over the global batch (see mmcl.losses).

    It has no parameters of its own (the logit scale/bias belong to the model), so it can be
    evaluated on cached features (`cacheable`: feature-cache gradient accumulation).
    With `same_label_negatives` False (FLYP, `data.captions_from_labels`), the batch's class
    `labels` travel with the features (`batch_outputs`, so feature caching keeps them too)
    and pairs of one class are no negatives of each other.
    """

    name = "clip"
    masks_labels = True  # FLYP can leave same-class pairs out of its negatives

    def __init__(self, loss: nn.Module, same_label_negatives: bool = True):
        super().__init__()
        self.loss = loss
        self.same_label_negatives = same_label_negatives

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        flyp = cls.masks_labels and cfg is not None and cfg.data.captions_from_labels
        return cls(build_loss(cls.name, chunk_size=chunk_size), same_label_negatives=not flyp)

    def batch_outputs(self, batch: dict) -> dict[str, Tensor]:
        if self.same_label_negatives:
            return {}
        if "labels" not in batch:
            raise ValueError("data.captions_from_labels needs class labels in every batch; the shards have no .cls files.")
        return {"labels": batch["labels"]}

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        features = (outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs.get("logit_bias"))
        if self.same_label_negatives:
            return self.loss(*features)
        return self.loss(*features, labels=outputs["labels"].long())  # combine() made them float


class SigLipObjective(ClipObjective):
    """siglip: SigLIP's pairwise sigmoid loss over the global batch (needs model.logit_bias_init)."""

    name = "siglip"
    masks_labels = False


class ClipQueueObjective(Objective):
    """CLIP's InfoNCE against momentum keys plus `size` queued keys of earlier batches per
    modality (ALBEF's contrastive loss), so a small batch still sees many negatives.

    Momentum (EMA) copies of both towers and projections encode each batch without gradient;
    the online image and text features are the queries, and every candidate is a momentum
    key: the global batch's, then the queue's (`mmcl.losses.ClipQueueLoss`). After the loss
    the batch's keys of every rank join the queues, which start empty.
    forward -> {"loss", "i2t_acc", "t2i_acc", "negatives"}; `after_step` -> {"momentum"}.
    """

    name = "clip_queue"

    def __init__(self, model: DualEncoder, dim: int, size: int = 4096, base_momentum: float = 0.995,
                 final_momentum: float = 1.0, distill: float = 0.0):
        super().__init__()
        self.loss = ClipQueueLoss(distill)
        # Plain attributes, not submodules: hidden from DeepSpeed (see mmcl.models.ema).
        object.__setattr__(self, "momentum", MomentumEncoder({"model": model}, base_momentum, final_momentum))
        object.__setattr__(self, "image_queue", KeyQueue(size, dim))
        object.__setattr__(self, "text_queue", KeyQueue(size, dim))

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        if cfg is None:
            raise ValueError("the clip_queue objective needs the run config (its queues are model.embed_dim wide).")
        settings = cls.settings_in(cfg)
        return cls(model, cfg.model.embed_dim, settings.size, settings.base_momentum, settings.final_momentum,
                   settings.distill)

    def encode_keys(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The momentum towers' normalised image and text features [B, D] (float32, no gradient)."""
        with self.momentum.ready(batch["pixel_values"]) as target:
            image = target["model"].encode_image(batch["pixel_values"]).float()
            text = target["model"].encode_text(batch["input_ids"], batch["attention_mask"]).float()
        return image, text

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        image_keys, text_keys = self.encode_keys(batch)
        for queue in (self.image_queue, self.text_queue):
            if queue.keys.device != image_keys.device:
                queue.to(image_keys.device)
        terms = self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], image_keys,
                          text_keys, self.image_queue.current(), self.text_queue.current(), outputs.get("logit_bias"))
        self.image_queue.enqueue(image_keys)
        self.text_queue.enqueue(text_keys)
        return terms

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        return {"momentum": self.momentum.update(step, total_steps, gather)}

    def extra_state(self) -> dict[str, Tensor]:
        state = {f"momentum.{k}": v for k, v in self.momentum.state_dict().items()}
        for name, queue in (("image_queue", self.image_queue), ("text_queue", self.text_queue)):
            state.update({f"{name}.{k}": v for k, v in queue.state_dict().items()})
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.momentum.load_state_dict(split_state(state, "momentum"), "clip_queue momentum towers")
        self.image_queue.load_state_dict(split_state(state, "image_queue"))
        self.text_queue.load_state_dict(split_state(state, "text_queue"))
