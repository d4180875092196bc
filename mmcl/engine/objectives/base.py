"""The objective interface, and what several objectives share (the image width, the key encoder's pass)."""
from __future__ import annotations

from torch import Tensor, nn

from mmcl.config import RunConfig
from mmcl.models import DualEncoder, Gather, no_gather, pool, pooled_width


class Objective(nn.Module):
    """Base of the objectives; see the package docstring.

    Subclasses set `needs` (or override `needs_for`), implement `build` and `forward`, and,
    when they hold state outside the optimizer (momentum encoders, queues), `after_step`,
    `extra_state` and `load_extra_state`.
    """

    needs: frozenset[str] = frozenset()  # what it reads from a batch: "pixel_values", "text", "views"
    cacheable: bool = False  # the loss can be evaluated on cached (detached) features

    @classmethod
    def needs_for(cls, cfg: RunConfig | None) -> frozenset[str]:
        """What this objective reads from a batch under `cfg` (most objectives: always `needs`)."""
        return cls.needs

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        """The objective for `model`, configured from `cfg` (defaults when None)."""
        raise NotImplementedError

    def batch_outputs(self, batch: dict) -> dict[str, Tensor]:
        """Extra outputs computed from the batch without gradient, beside the model's (the
        distillation teacher's features); they travel with the features through feature caching."""
        return {}

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        """Called once after optimizer step `step` (1-based) of `total_steps`; returns values to log."""
        return {}

    def extra_state(self) -> dict[str, Tensor]:
        """Tensors DeepSpeed does not checkpoint (the same on every rank)."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got {sorted(state)[:3]}")


def image_width(model: DualEncoder) -> int:
    """The width of the image tower's pooled output, which the SSL heads read."""
    return pooled_width(model.image_tower, model.image_pooling)


def encode_with(target: nn.ModuleDict, pooling: str, images: Tensor) -> Tensor:
    """A momentum copy's pass: target["tower"] -> pooling -> target["projector"]; [N, 3, H, W] -> [N, out] float32."""
    return target["projector"](pool(target["tower"](pixel_values=images), pooling, "image")).float()


def split_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    return {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
