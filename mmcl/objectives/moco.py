"""MoCo: a query encoder trained by the optimizer against a momentum key encoder, with a queue of past keys.

    q = [predictor](projector(tower(view)))           query encoder, with gradient
    k = projector'(tower'(view))                       key encoder: EMA copies, no gradient
    L = (ctr(q1, k2) + ctr(q2, k1)) / 2                mmcl.losses.MoCoLoss

v2 (`queue_size` K > 0): each query's negatives are the K queued keys; after the loss the
keys of both views from every rank join the queue (all-gathered, 2*W*B per micro-batch,
wrapping around K). As in MoCo, the queue starts full of random unit vectors (drawn from
the global generator, which the trainer seeds alike on every rank). v3 (`queue_size: 0`, usually with `predictor: true`): the negatives are
the keys of the global batch. The key encoder is `mmcl.models.MomentumEncoder` (BYOL's
machinery, ZeRO-3 aware); the queue is `mmcl.models.KeyQueue`. Both are saved in every
checkpoint's task state (`momentum.*`, `queue.keys|pointer|filled`) and restored exactly.

Shuffling BN (`shuffle_bn`, MoCo v2): BatchNorm in the key encoder (in its projector here,
and in CNN towers) computes statistics over the rank's key batch; if that batch holds
exactly the images of the rank's query batch, the statistics leak which key is the
positive. So the key batch is shuffled across ranks: all ranks gather the views, rank 0
draws one permutation (broadcast), each rank encodes its slice of the permuted images,
and the keys are gathered and put back in order. With one rank there is nothing to
shuffle with (as in MoCo); ViT towers have no BatchNorm, only the projector does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from mmcl.distributed import all_gather_no_grad, get_rank, get_world_size
from mmcl.losses import MoCoLoss
from mmcl.models import DualEncoder, Gather, KeyQueue, MLPHead, MomentumEncoder, no_gather
from mmcl.objectives.base import Objective, encode_with, image_width, split_legacy_state, split_state, sync_batchnorm

if TYPE_CHECKING:
    from mmcl.config import RunConfig
    from mmcl.objectives.settings import MoCoConfig


class MoCoObjective(Objective):
    """See the module docstring. forward -> {"loss", "acc"[, "queue_filled"]}; `after_step` -> {"momentum"}."""

    name = "moco"

    def __init__(self, model: DualEncoder, in_dim: int, settings: MoCoConfig, sync_batchnorm: bool = False):
        super().__init__()
        s = settings
        self.projector = MLPHead(in_dim, s.hidden_dim, s.out_dim, s.num_layers, sync_batchnorm=sync_batchnorm)
        self.predictor = MLPHead(s.out_dim, s.hidden_dim, s.out_dim, 2, sync_batchnorm=sync_batchnorm) if s.predictor else None
        # v3 scales the loss by 2T; with a queue (v2) it is the plain cross entropy.
        self.loss = MoCoLoss(s.temperature, scale_by_temperature=s.queue_size == 0)
        self.shuffle_bn = s.shuffle_bn
        # Plain attributes, not submodules: hidden from DeepSpeed (see mmcl.models.ema).
        object.__setattr__(self, "pooling", model.image_pooling)
        object.__setattr__(self, "momentum", MomentumEncoder({"tower": model.image_tower, "projector": self.projector},
                                                                s.base_momentum, s.final_momentum))
        object.__setattr__(self, "queue", KeyQueue(s.queue_size, s.out_dim) if s.queue_size > 0 else None)
        if self.queue is not None:  # MoCo starts from random unit keys: K negatives from the first step
            self.queue.keys.copy_(torch.nn.functional.normalize(torch.randn(s.queue_size, s.out_dim), dim=-1))
            self.queue.filled = s.queue_size

    @classmethod
    def build(cls, model: DualEncoder, cfg: RunConfig | None = None, chunk_size: int | None = None) -> Objective:
        return cls(model, image_width(model), cls.settings_in(cfg), sync_batchnorm=sync_batchnorm(cfg))

    def encode_keys(self, views: list[Tensor]) -> Tensor:
        """views: 2 batches [B, 3, H, W] -> keys [2B, out_dim] (float32, no gradient), view 1 then view 2."""
        images = torch.cat(list(views))
        world = get_world_size()
        with self.momentum.ready(images) as target:
            if not self.shuffle_bn or world == 1:
                return encode_with(target, self.pooling, images)
            gathered = all_gather_no_grad(images)  # [W * 2B, ...]
            order = torch.randperm(gathered.shape[0], device=images.device)
            dist.broadcast(order, src=0)  # one permutation for all ranks
            local = gathered[order.view(world, -1)[get_rank()]]
            shuffled = all_gather_no_grad(encode_with(target, self.pooling, local))  # keys of gathered[order]
            keys = torch.empty_like(shuffled)
            keys[order] = shuffled
            return keys.view(world, images.shape[0], -1)[get_rank()]

    def forward(self, outputs: dict[str, Tensor], batch: dict | None = None) -> dict[str, Tensor]:
        queries = self.projector(outputs["view_features"])
        if self.predictor is not None:
            queries = self.predictor(queries)
        q1, q2 = queries.float().chunk(2)
        keys = self.encode_keys(batch["views"])
        k1, k2 = keys.chunk(2)
        if self.queue is None:
            return self.loss(q1, q2, k1, k2)
        if self.queue.keys.device != keys.device:
            self.queue.to(keys.device)
        terms = self.loss(q1, q2, k1, k2, self.queue.current())  # the queue before this batch's keys
        self.queue.enqueue(torch.nn.functional.normalize(keys, dim=-1))
        return {**terms, "queue_filled": torch.tensor(float(self.queue.filled))}

    def after_step(self, step: int, total_steps: int, gather: Gather = no_gather) -> dict[str, float]:
        return {"momentum": self.momentum.update(step, total_steps, gather)}

    def extra_state(self) -> dict[str, Tensor]:
        state = {f"momentum.{k}": v for k, v in self.momentum.state_dict().items()}
        if self.queue is not None:
            state.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.momentum.load_state_dict(split_legacy_state(state, "momentum", "key_encoder"), "MoCo momentum copy")
        if self.queue is not None:
            self.queue.load_state_dict(split_state(state, "queue"))
