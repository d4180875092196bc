"""The one module DeepSpeed wraps: the model plus its weighted objectives.

`forward(batch)` returns `{"loss": total, "<objective>": value, "<objective>/<metric>": value}`
(OpenCLIP's newest code calls this shape a training task). Every trainable parameter is
used inside this forward, which ZeRO-3's parameter gathering needs, and the trainer loop
stays free of model details.

Feature-cache gradient accumulation (GradCache's method, reshaped for DeepSpeed) uses two
more modes of the same forward, so that everything touching parameters runs inside the
engine: `encode` (features, logit scale and bias, without gradient) and `surrogate`
(re-encode with gradient; a scalar whose backward pushes the cached feature gradients into
the towers). In between, `combine` runs outside the engine on the cached features: the
objectives have no parameters, so ZeRO never sees it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcl.losses import build_loss
from mmcl.models import DualEncoder

FEATURE_KEYS = ("image_features", "text_features")


class ContrastiveTask(nn.Module):
    """model + {objective name: weight}; see the module docstring for the forward modes."""

    def __init__(self, model: DualEncoder, objectives: dict[str, float], chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.weights = dict(objectives)
        self.objectives = nn.ModuleDict({name: build_loss(name, chunk_size=chunk_size) for name in objectives})

    def forward(self, batch: dict[str, Tensor], mode: str = "train", **kwargs) -> dict[str, Tensor]:
        if mode == "train":
            return self.combine(self.encode(batch))
        if mode == "encode":
            with torch.no_grad():
                outputs = self.encode(batch)
            return {key: value.detach() for key, value in outputs.items()}
        if mode == "surrogate":
            return self.surrogate(batch, **kwargs)
        if mode == "zero":  # an exact-zero loss that still runs through DeepSpeed's backward
            return {"loss": self.model()["logit_scale"] * 0.0}
        if mode == "encode_image":
            return {"image_features": self.model.encode_image(batch["pixel_values"])}
        if mode == "encode_text":
            return {"text_features": self.model.encode_text(batch["input_ids"], batch["attention_mask"])}
        raise ValueError(f"unknown task mode {mode!r}")

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch -> image_features [B, D], text_features [B, D], logit_scale (, logit_bias)."""
        return self.model(
            pixel_values=batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )

    def combine(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weighted sum of the objectives over `outputs`, plus each objective's value and metrics."""
        result: dict[str, Tensor] = {}
        total = None
        # Low-precision towers: the loss itself is computed in float32.
        outputs = {key: value.float() if torch.is_tensor(value) else value for key, value in outputs.items()}
        for name, objective in self.objectives.items():
            terms = objective(
                outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs.get("logit_bias")
            )
            weighted = self.weights[name] * terms["loss"]
            total = weighted if total is None else total + weighted
            result[name] = terms["loss"].detach()
            for metric, value in terms.items():
                if metric != "loss":
                    result[f"{name}/{metric}"] = value.detach()
        result["loss"] = total
        result["logit_scale"] = outputs["logit_scale"].detach()
        return result

    def surrogate(
        self,
        batch: dict[str, Tensor],
        feature_grads: dict[str, Tensor],
        cached_features: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """A scalar whose gradient w.r.t. the parameters is this micro-batch's share of the full loss's.

        sum(features * cached_grads) carries the towers' gradient. With `cached_features`
        (given on exactly one micro-step) the objectives are evaluated once more on the
        detached full cache, so the logit scale and bias receive their gradient once, not k
        times (OpenCLIP's accum_freq counts it k times). Other micro-steps touch them with a
        zero weight so every parameter's gradient hook fires on every micro-step, which
        DeepSpeed's ZeRO bookkeeping expects.
        """
        outputs = self.encode(batch)
        total = sum((outputs[key] * feature_grads[key]).sum() for key in FEATURE_KEYS)
        if cached_features is not None:
            total = total + self.combine({**cached_features, **{k: outputs[k] for k in ("logit_scale", "logit_bias") if k in outputs}})["loss"]
        else:
            total = total + 0.0 * outputs["logit_scale"] + (0.0 * outputs["logit_bias"] if "logit_bias" in outputs else 0.0)
        return {"loss": total}
