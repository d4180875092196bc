"""The objective interface — each subclass is its objective's one declaration — and what several
objectives share (the image width, the momentum copy's pass, the settings lookup)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from mmcl.coerce import ConfigError, probability
from mmcl.models import DualEncoder, Gather, no_gather, pool, pooled_width

if TYPE_CHECKING:  # the config module imports the objectives, not the other way round
    from mmcl.config import RunConfig


class Objective(nn.Module):
    """Base of the objectives; see the package docstring.

    A subclass declares, as class attributes, everything the rest of mmcl asks of it: `name`
    (its key in `objectives:`), `settings` (its dataclass of config keys, or None) and
    `settings_key` (where they live in a run config, e.g. "ssl.simclr"), `needs` (what it reads
    from a batch; or override `needs_for`), `cacheable`, `image_text`, `state` (for the docs),
    `check` (its cross-section config rules) and `build`. It implements `forward` and, when it
    holds state outside the optimizer (momentum copies, queues), `after_step`, `extra_state` and
    `load_extra_state`. Registering it is one entry in `mmcl.engine.objectives.OBJECTIVES`.
    """

    name: str = ""  # its key in `objectives:`
    settings: type | None = None  # its dataclass of config keys (beside it, in its module)
    settings_key: str | None = None  # where those keys live in a run config: "ssl.simclr", "loss.clip_queue", "distill"
    needs: frozenset[str] = frozenset()  # what it reads from a batch: "pixel_values", "text", "views", "teacher"
    cacheable: bool = False  # the loss can be evaluated on cached (detached) features (feature-cache accumulation)
    image_text: bool = False  # learns from image-caption pairs: needs the text tower, trains the logit scale
    state: str = "-"  # state outside the optimizer, for the docs' table

    @classmethod
    def needs_for(cls, cfg: RunConfig | None) -> frozenset[str]:
        """What this objective reads from a batch under `cfg` (most objectives: always `needs`)."""
        return cls.needs

    @classmethod
    def settings_in(cls, cfg: RunConfig | None) -> Any:
        """This objective's settings in `cfg` (at `settings_key`), or their defaults when `cfg` is None."""
        if cfg is None:
            return cls.settings()
        node: Any = cfg
        for part in cls.settings_key.split("."):
            node = getattr(node, part)
        return node

    @classmethod
    def check(cls, cfg: RunConfig, source: str) -> None:
        """Config rules that span its settings and other sections, for a run that uses it (raise ConfigError)."""

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
