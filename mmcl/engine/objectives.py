"""Training objectives: small modules that turn the model's outputs into a loss, and their registry.

    objective = build_objective("simclr", model, cfg)     # cfg: the RunConfig (None: defaults)
    terms = objective(outputs, batch)                     # {"loss": scalar, <metric>: scalar, ...}

Adding an objective: a subclass of `Objective` (with `needs`, `build`, `forward`), one line in
`OBJECTIVES`, and its name in `mmcl.config.KNOWN_OBJECTIVES` (the config module imports no torch).

`outputs` is the dual encoder's forward on the batch (computed once by the task for all
objectives): `image_features`, `text_features` [B, D] (normalised), `view_features` [2B, W]
(pooled image-tower outputs of the two SSL views, view 1 then view 2), `logit_scale`,
`logit_bias`. Each objective class declares what it reads from the batch in `needs`
("pixel_values", "text", "views"), so the task encodes and the data pipeline produces
only what is used.

- `clip` / `siglip` (`ContrastiveObjective`): the image-text losses; no parameters of their
  own (the logit scale/bias belong to the model), so they can be evaluated on cached
  features (`cacheable`: feature-cache gradient accumulation).
- `simclr`: an MLP projector on the views' pooled features, NT-Xent over the 2N views of all
  ranks (SimCLR; beside clip this is SLIP).
- `byol`: online projector + predictor; a target network (a copy of the image tower and the
  projector) updated as an EMA of the online one after every optimizer step.

The BYOL target is deliberately not a registered submodule: DeepSpeed never sees it, so it is
not in the optimizer, not cast to bf16/fp16, not partitioned by ZeRO-3 and not in DeepSpeed's
checkpoint. It is a float32 replica on every rank (4 bytes per image-tower parameter), kept
identical across ranks because every rank applies the same EMA update to the same weights.
The trainer saves it (`extra_state`) beside each checkpoint and restores it on resume.
Under ZeRO-3 the EMA update reads the online parameters inside `gather` (DeepSpeed's
GatheredParameters, a chunk at a time).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import ContextManager

import torch
from torch import Tensor, nn

from mmcl.config import CONTRASTIVE_OBJECTIVES, BYOLConfig, RunConfig, SimCLRConfig
from mmcl.losses import BYOLLoss, NTXentLoss, build_loss
from mmcl.models import DualEncoder, MLPHead, cosine_momentum, ema_update_, frozen_copy, pool, pooled_width

Gather = Callable[[list[nn.Parameter]], ContextManager]


def no_gather(parameters: list[nn.Parameter]) -> ContextManager:
    """The parameters are already whole (no ZeRO-3): nothing to gather."""
    return contextlib.nullcontext()


class Objective(nn.Module):
    """Base of the objectives; see the module docstring."""

    needs: frozenset[str] = frozenset()  # what it reads from a batch: "pixel_values", "text", "views"
    cacheable: bool = False  # the loss can be evaluated on cached (detached) features

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        """The objective for `model`, configured from `cfg` (defaults when None)."""
        raise NotImplementedError

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


class ContrastiveObjective(Objective):
    """clip / siglip: the image-text loss on the normalised features (see mmcl.losses)."""

    needs = frozenset({"pixel_values", "text"})
    cacheable = True
    loss_name = "clip"

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        return cls(build_loss(cls.loss_name, chunk_size=chunk_size))

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        return self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs.get("logit_bias"))


class SigLipObjective(ContrastiveObjective):
    loss_name = "siglip"


class SimCLRObjective(Objective):
    """SimCLR: projector(pooled view features) -> NT-Xent over 2N views with all ranks' negatives.

    forward -> {"loss", "view_acc"} (see `mmcl.losses.NTXentLoss`).
    """

    needs = frozenset({"views"})

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                 temperature: float = 0.1):
        super().__init__()
        self.head = MLPHead(in_dim, hidden_dim, out_dim, num_layers)
        self.loss = NTXentLoss(temperature)

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        settings = cfg.ssl.simclr if cfg is not None else SimCLRConfig()
        return cls(_image_width(model), settings.hidden_dim, settings.out_dim, settings.num_layers, simclr_temperature(cfg))

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        z1, z2 = self.head(outputs["view_features"]).float().chunk(2)
        return self.loss(z1, z2)


class BYOLObjective(Objective):
    """BYOL: predictor(projector(online view features)) regresses the target's projection of the other view.

    The target (image tower + projector copies, EMA weights) encodes the same views without
    gradient, in the online network's train/eval modes, with the online pooling.
    forward -> {"loss", "cos"} (see `mmcl.losses.BYOLLoss`); `after_step` -> {"momentum"}.
    """

    needs = frozenset({"views"})

    def __init__(self, model: DualEncoder, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256,
                 base_momentum: float = 0.99, final_momentum: float = 1.0):
        super().__init__()
        self.projector = MLPHead(in_dim, hidden_dim, out_dim, 2)
        self.predictor = MLPHead(out_dim, hidden_dim, out_dim, 2)
        self.loss = BYOLLoss()
        self.base_momentum, self.final_momentum = float(base_momentum), float(final_momentum)
        # Plain attributes, not submodules (see the module docstring): hidden from DeepSpeed.
        object.__setattr__(self, "online_model", model)
        object.__setattr__(self, "target", nn.ModuleDict({"tower": frozen_copy(model.image_tower),
                                                          "projector": frozen_copy(self.projector)}))

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        settings = cfg.ssl.byol if cfg is not None else BYOLConfig()
        return cls(model, _image_width(model), settings.hidden_dim, settings.out_dim, settings.base_momentum,
                   settings.final_momentum)

    def online_modules(self) -> dict[str, nn.Module]:
        return {"tower": self.online_model.image_tower, "projector": self.projector}

    def parameter_pairs(self) -> Iterator[tuple[Tensor, nn.Parameter]]:
        """(target tensor, online parameter) pairs, matched by name."""
        for key, online in self.online_modules().items():
            target = dict(self.target[key].named_parameters())
            for name, parameter in online.named_parameters():
                yield target[name], parameter

    @torch.no_grad()
    def encode_target(self, views: list[Tensor]) -> Tensor:
        """views: V batches [B, 3, H, W] -> target projections [V*B, out_dim] (float32, no gradient)."""
        images = torch.cat(list(views))
        self.target.to(images.device)  # no-op after the first call
        for key, online in self.online_modules().items():  # same train/eval modes as the online network
            for target_module, online_module in zip(self.target[key].modules(), online.modules()):
                target_module.training = online_module.training
        low_precision = images.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(images.device.type, dtype=images.dtype, enabled=low_precision):
            pooled = pool(self.target["tower"](pixel_values=images), self.online_model.image_pooling, "image")
            projected = self.target["projector"](pooled)
        return projected.float()

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        p1, p2 = self.predictor(self.projector(outputs["view_features"])).float().chunk(2)
        t1, t2 = self.encode_target(batch["views"]).chunk(2)
        return self.loss(p1, p2, t1, t2)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        momentum = cosine_momentum(step - 1, total_steps, self.base_momentum, self.final_momentum)
        for chunk in _chunks(list(self.parameter_pairs())):
            targets, onlines = [t for t, _ in chunk], [o for _, o in chunk]
            with gather(onlines):
                ema_update_(targets, onlines, momentum)
        return {"momentum": momentum}

    def extra_state(self) -> dict[str, Tensor]:
        return {f"target.{name}": tensor for name, tensor in self.target.state_dict().items()}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        expected = {f"target.{name}" for name in self.target.state_dict()}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"the saved BYOL target does not match this model (missing {missing[:2]}, unexpected {unexpected[:2]}).")
        self.target.load_state_dict({name[len("target."):]: tensor for name, tensor in state.items()})


def _chunks(pairs: list[tuple[Tensor, nn.Parameter]], max_elements: int = 50_000_000) -> Iterable[list]:
    """Split the pairs so that one gathered chunk holds at most ~max_elements online values."""
    chunk, size = [], 0
    for pair in pairs:
        numel = getattr(pair[1], "ds_numel", pair[1].numel())  # ZeRO-3: the full size of a partitioned parameter
        if chunk and size + numel > max_elements:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += numel
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- registry


def _image_width(model: DualEncoder) -> int:
    return pooled_width(model.image_tower, model.image_pooling)


def simclr_temperature(cfg: RunConfig | None) -> float:
    """ssl.simclr.temperature, or its default: 0.1 beside an image-text objective (SLIP), 0.2 alone."""
    if cfg is not None and cfg.ssl.simclr.temperature is not None:
        return cfg.ssl.simclr.temperature
    joint = cfg is not None and any(name in CONTRASTIVE_OBJECTIVES for name in cfg.objectives)
    return 0.1 if joint else 0.2


OBJECTIVES: dict[str, type[Objective]] = {
    "clip": ContrastiveObjective,
    "siglip": SigLipObjective,
    "simclr": SimCLRObjective,
    "byol": BYOLObjective,
}


def build_objective(name: str, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
    """The objective `name` for `model`, configured from `cfg` (defaults when None); `chunk_size`
    tiles the image-text losses (`loss.chunk_size`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives are: {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name].build(model, cfg, chunk_size)


def needs_of(objectives: Iterable[str]) -> frozenset[str]:
    """What the named objectives read from a batch: "pixel_values", "text", "views"."""
    return frozenset().union(*(OBJECTIVES[name].needs for name in objectives))
