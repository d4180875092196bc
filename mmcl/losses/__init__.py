"""Training objectives: small nn.Modules plus their functional forms, and the registry
that maps config names (`objectives: {clip: 1.0}`) to them."""

from __future__ import annotations

from torch import nn

from mmcl.losses.byol import BYOLLoss, byol_loss
from mmcl.losses.clip import ClipLoss, clip_loss
from mmcl.losses.clip_queue import ClipQueueLoss, clip_queue_loss
from mmcl.losses.distill import DistillLoss, distill_loss
from mmcl.losses.moco import MoCoLoss, moco_loss
from mmcl.losses.ntxent import NTXentLoss, ntxent_loss
from mmcl.losses.siglip import SigLipLoss, siglip_loss
from mmcl.losses.simsiam import SimSiamLoss, simsiam_loss
from mmcl.losses.triplet import TripletLoss, triplet_loss

LOSSES: dict[str, type[nn.Module]] = {
    "clip": ClipLoss,
    "siglip": SigLipLoss,
    "ntxent": NTXentLoss,
    "byol": BYOLLoss,
    "moco": MoCoLoss,
    "simsiam": SimSiamLoss,
    "triplet": TripletLoss,
    "clip_queue": ClipQueueLoss,
    "distill": DistillLoss,
}


def build_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered loss `name` with `kwargs` (e.g. chunk_size=4096)."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; known losses are: {', '.join(sorted(LOSSES))}.")
    return LOSSES[name](**kwargs)


__all__ = [
    "LOSSES", "BYOLLoss", "ClipLoss", "ClipQueueLoss", "DistillLoss", "MoCoLoss", "NTXentLoss", "SigLipLoss", "SimSiamLoss",
    "TripletLoss", "build_loss", "byol_loss", "clip_loss", "clip_queue_loss", "distill_loss", "moco_loss", "ntxent_loss",
    "siglip_loss", "simsiam_loss", "triplet_loss",
]
