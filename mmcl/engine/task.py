"""The one module DeepSpeed wraps: the model plus its weighted objectives.

`task(batch)` returns `{"loss": total, "<objective>": value, "<objective>/<metric>": value}`
(plus `"logit_scale"` when an image-text objective is present; OpenCLIP's newest code calls
this shape a training task). The model encodes the batch once (`encode`: the CLIP view, the
captions and the SSL views, as the objectives need) and every objective reads what it needs
from those outputs (`combine`). Every trainable parameter is used inside this pass, which
ZeRO-3's parameter gathering needs. In runs without an image-text objective the (unused)
logit scale enters the loss with weight 0, so it too gets its (zero) gradient every step.

Whatever touches parameters runs inside the engine's forward (ZeRO-3 gathering, mixed
precision autocast, DeepSpeed's timers): `engine(batch)` is the training loss, and
`engine(batch, task.features)` runs another named method there: `features` and `surrogate`
(feature-cache accumulation, `mmcl.engine.feature_cache`) and `zero_loss`. `combine` on cached features
runs outside the engine: the image-text objectives have no parameters, so ZeRO never sees
it. Objectives with parameters or state of their own (the SSL heads with BatchNorm, the
momentum copies) are not cacheable (`cacheable` is False); the trainer then accumulates plainly.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmcl.models import DualEncoder, Gather, no_gather
from mmcl.objectives import OBJECTIVES, build_objective

if TYPE_CHECKING:
    from mmcl.config import RunConfig

FEATURE_KEYS = ("image_features", "text_features")


def at_least_float32(value: Tensor) -> Tensor:
    """`value` as float32, or unchanged when float64 (equality checks run the towers in float64)."""
    return value if value.dtype == torch.float64 else value.float()


class TrainingTask(nn.Module):
    """model + {objective name: weight}; see the module docstring.

    cfg (the RunConfig) configures the objectives' settings; chunk_size chunks the image-text
    losses (`loss.chunk_size`).
    """

    def __init__(self, model: DualEncoder, objectives: dict[str, float], chunk_size: int | None = None,
                 cfg: RunConfig | None = None):
        super().__init__()
        self.model = model
        self.weights = dict(objectives)
        self.objectives = nn.ModuleDict({name: build_objective(name, model, cfg, chunk_size) for name in objectives})
        self.needs = frozenset().union(*(objective.needs for objective in self.objectives.values()))
        self.cacheable = all(objective.cacheable for objective in self.objectives.values())
        self.uses_logit_scale = any(OBJECTIVES[name].image_text for name in objectives)

    def forward(self, batch: dict[str, Tensor], via: Callable[..., dict[str, Tensor]] | None = None,
                *args) -> dict[str, Tensor]:
        """The training loss of `batch`: encode it once, then every objective (`combine`).

        With `via`, one of this task's other methods runs instead, `via(batch, *args)`, so that it
        too runs inside the engine (`engine(batch, task.features)`; see the module docstring).
        """
        if via is not None:
            return via(batch, *args)
        return self.combine(self.encode(batch), batch)

    @torch.no_grad()
    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`encode` without gradient, detached: what feature caching keeps of a micro-batch."""
        return {key: value.detach() for key, value in self.encode(batch).items()}

    def zero_loss(self, batch: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """An exact-zero loss that still runs through DeepSpeed's backward (a skipped micro-batch)."""
        return {"loss": self.model()["logit_scale"] * 0.0}

    def encode(self, batch: dict[str, Tensor], batch_outputs: bool = True) -> dict[str, Tensor]:
        """batch -> image_features [B, D], text_features [B, D], view_features [2B, W] (as the
        objectives need), logit_scale (, logit_bias), and with `batch_outputs` what objectives
        add without gradient (the distillation teacher's features; not needed on re-encoding)."""
        text = "text" in self.needs
        images = "pixel_values" in self.needs
        outputs = self.model(
            pixel_values=batch["pixel_values"] if images else None,
            input_ids=batch["input_ids"] if text else None,
            attention_mask=batch["attention_mask"] if text else None,
            views=batch["views"] if "views" in self.needs else None,
            # NaFlex batches (data.naflex) carry these beside their patch sequences
            pixel_attention_mask=batch.get("pixel_attention_mask") if images else None,
            spatial_shapes=batch.get("spatial_shapes") if images else None,
        )
        if batch_outputs:
            for objective in self.objectives.values():
                outputs.update(objective.batch_outputs(batch))
        return outputs

    def combine(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        """Weighted sum of the objectives over `outputs`, plus each objective's value and metrics."""
        result: dict[str, Tensor] = {}
        total = None
        # Low-precision towers: the losses themselves are computed in float32 (float64 towers stay float64).
        outputs = {key: at_least_float32(value) if torch.is_tensor(value) else value for key, value in outputs.items()}
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

    # -------------------------------------------------------------- outside the engine

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
