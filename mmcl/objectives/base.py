"""The objectives' module interface, and what several objectives share (the image width, the
momentum copy's pass, the settings lookup)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mmcl.models import DualEncoder, Gather, no_gather, pool, pooled_width
from mmcl.objectives.settings import OBJECTIVES

if TYPE_CHECKING:  # the config module imports the objectives, not the other way round
    from mmcl.config import RunConfig


class Objective(nn.Module):
    """Base of the objectives' modules; see the package docstring.

    An objective is declared once, torch-free, by its `ObjectiveSpec` in
    `mmcl.objectives.settings` (name, settings, what it reads, rules, this builder). Its module
    subclasses this class: `name` (its key in `objectives:`) ties the two, `build` makes it from
    a run config, `forward` computes its terms and, when it holds state outside the optimizer
    (momentum copies, queues), `after_step`, `extra_state` and `load_extra_state` manage it.
    `build_objective` sets `needs` and `cacheable` from the declaration.
    """

    name: str = ""  # its key in `objectives:`
    needs: frozenset[str] = frozenset()  # what it reads from a batch (set from its declaration by build_objective)
    cacheable: bool = False  # the loss can be evaluated on cached features (set from its declaration)

    @classmethod
    def settings_in(cls, cfg: RunConfig | None) -> Any:
        """This objective's settings in `cfg`, or their defaults when `cfg` is None."""
        return OBJECTIVES[cls.name].settings_in(cfg)

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


def sync_batchnorm(cfg: RunConfig | None) -> bool:
    """ssl.sync_batchnorm: BatchNorm in the SSL heads over the global batch."""
    return cfg is not None and cfg.ssl.sync_batchnorm


def image_width(model: DualEncoder) -> int:
    """The width of the image tower's pooled output, which the SSL heads read."""
    return pooled_width(model.image_tower, model.image_pooling)


def encode_with(momentum: nn.ModuleDict, pooling: str, images: Tensor) -> Tensor:
    """A momentum copy's pass: momentum["tower"] -> pooling -> momentum["projector"]; [N, 3, H, W] -> [N, out] float32."""
    return momentum["projector"](pool(momentum["tower"](pixel_values=images), pooling, "image")).float()


def split_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    return {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}


def split_legacy_state(state: dict[str, Tensor], prefix: str, legacy: str) -> dict[str, Tensor]:
    """`split_state` under `prefix`, or under `legacy`, the name checkpoints of older versions used."""
    return split_state(state, prefix) or split_state(state, legacy)
