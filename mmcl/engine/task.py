"""The one module DeepSpeed wraps: the model plus its weighted objectives.

`forward(batch)` returns `{"loss": total, "<objective>": value, "<objective>/<metric>": value}`
(plus `"logit_scale"` when an image-text objective is present; OpenCLIP's newest code calls
this shape a training task). The model encodes the batch once — the CLIP view, the captions
and the SSL views, as the objectives need (`mmcl.engine.objectives`) — and every objective
reads what it needs from those outputs. Every trainable parameter is used inside this
forward, which ZeRO-3's parameter gathering needs, and the trainer loop stays free of model
details. In runs without an image-text objective the (unused) logit scale enters the loss
with weight 0, so it too gets its (zero) gradient every step.

Feature-cache gradient accumulation (GradCache's method, reshaped for DeepSpeed) uses two
more modes of the same forward, so that everything touching parameters runs inside the
engine: `encode` (features, logit scale and bias, without gradient) and `surrogate`
(re-encode with gradient; a scalar whose backward pushes the cached feature gradients into
the towers). In between, `combine` runs outside the engine on the cached features: the
image-text objectives have no parameters, so ZeRO never sees it. Objectives with parameters
or state of their own (SimCLR's and BYOL's heads with BatchNorm, BYOL's EMA target) are not
cacheable (`cacheable` is False); the trainer then accumulates plainly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcl.config import CONTRASTIVE_OBJECTIVES, RunConfig
from mmcl.engine.objectives import Gather, build_objective, no_gather
from mmcl.models import DualEncoder

FEATURE_KEYS = ("image_features", "text_features")


class TrainingTask(nn.Module):
    """model + {objective name: weight}; see the module docstring for the forward modes.

    cfg (the RunConfig) configures the self-supervised objectives (`ssl.*`); chunk_size
    tiles the image-text losses (`loss.chunk_size`).
    """

    def __init__(self, model: DualEncoder, objectives: dict[str, float], chunk_size: int | None = None,
                 cfg: RunConfig | None = None):
        super().__init__()
        self.model = model
        self.weights = dict(objectives)
        self.objectives = nn.ModuleDict({name: build_objective(name, model, cfg, chunk_size) for name in objectives})
        self.needs = frozenset().union(*(objective.needs for objective in self.objectives.values()))
        self.cacheable = all(objective.cacheable for objective in self.objectives.values())
        self.uses_logit_scale = any(name in CONTRASTIVE_OBJECTIVES for name in objectives)

    def forward(self, batch: dict[str, Tensor], mode: str = "train", **kwargs) -> dict[str, Tensor]:
        if mode == "train":
            return self.combine(self.encode(batch), batch)
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

    def encode(self, batch: dict[str, Tensor], batch_outputs: bool = True) -> dict[str, Tensor]:
        """batch -> image_features [B, D], text_features [B, D], view_features [2B, W] (as the
        objectives need), logit_scale (, logit_bias), and with `batch_outputs` what objectives
        add without gradient (the distillation teacher's features; not needed on re-encoding)."""
        text = "text" in self.needs
        outputs = self.model(
            pixel_values=batch["pixel_values"] if "pixel_values" in self.needs else None,
            input_ids=batch["input_ids"] if text else None,
            attention_mask=batch["attention_mask"] if text else None,
            views=batch["views"] if "views" in self.needs else None,
        )
        if batch_outputs:
            for objective in self.objectives.values():
                outputs.update(objective.batch_outputs(batch))
        return outputs

    def combine(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        """Weighted sum of the objectives over `outputs`, plus each objective's value and metrics."""
        result: dict[str, Tensor] = {}
        total = None
        # Low-precision towers: the losses themselves are computed in float32.
        outputs = {key: value.float() if torch.is_tensor(value) else value for key, value in outputs.items()}
        for name, objective in self.objectives.items():
            terms = objective(outputs, batch)
            weighted = self.weights[name] * terms["loss"]
            total = weighted if total is None else total + weighted
            result[name] = terms["loss"].detach()
            for metric, value in terms.items():
                if metric != "loss":
                    result[f"{name}/{metric}"] = value.detach()
        if self.uses_logit_scale:
            result["logit_scale"] = outputs["logit_scale"].detach()
        else:  # unused by every objective: a zero-weight term gives it a (zero) gradient
            total = total + 0.0 * outputs["logit_scale"] + (0.0 * outputs["logit_bias"] if "logit_bias" in outputs else 0.0)
        result["loss"] = total
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
        outputs = self.encode(batch, batch_outputs=False)
        total = sum((outputs[key] * feature_grads[key]).sum() for key in FEATURE_KEYS)
        if cached_features is not None:
            total = total + self.combine({**cached_features, **{k: outputs[k] for k in ("logit_scale", "logit_bias") if k in outputs}})["loss"]
        else:
            total = total + 0.0 * outputs["logit_scale"] + (0.0 * outputs["logit_bias"] if "logit_bias" in outputs else 0.0)
        return {"loss": total}

    # -------------------------------------------------------------- outside the engine's forward

    def teacher_inputs(self):
        """The distillation teacher's `TeacherInputs` (image size, normalisation, tokenizer), or None."""
        teacher = getattr(self.objectives["distill"], "teacher", None) if "distill" in self.objectives else None
        return teacher.inputs() if teacher is not None else None

    def after_optimizer_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        """Per-step updates of the objectives (BYOL's EMA target) after optimizer step `step`
        (1-based); `gather` makes ZeRO-3-partitioned parameters whole. Returns values to log."""
        logged: dict[str, float] = {}
        for name, objective in self.objectives.items():
            logged.update({f"{name}/{key}": value for key, value in objective.after_step(step, total_steps, gather).items()})
        return logged

    def extra_state(self) -> dict[str, Tensor]:
        """State outside DeepSpeed's checkpoint (BYOL's target), keyed `<objective>.<name>`."""
        return {f"{name}.{key}": value for name, objective in self.objectives.items()
                for key, value in objective.extra_state().items()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        for name, objective in self.objectives.items():
            prefix = f"{name}."
            objective.load_extra_state({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})


ContrastiveTask = TrainingTask  # the name before the self-supervised objectives existed
