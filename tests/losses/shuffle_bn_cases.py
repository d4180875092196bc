"""What each gloo rank computes in tests/losses/test_moco_shuffle_bn.py (kept free of pytest imports)."""
from __future__ import annotations

import torch
from torch import Tensor

from mmcl.config import from_dict
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def shuffle_bn_case(rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank `rank`'s MoCo keys of its own views, with and without shuffling BN, in eval and train mode."""
    cfg = from_dict({"model": {"image": {"config": VIT, "pooling": "cls", "projection": "none"}, "embed_dim": 32},
                     "objectives": {"moco": 1.0}, "ssl": {"moco": {"hidden_dim": 24, "out_dim": 8, "queue_size": 16}}})
    torch.manual_seed(0)  # the same weights on every rank
    task = TrainingTask(build_model(cfg.model), cfg.objectives, None, cfg)
    moco = task.objectives["moco"]
    g = torch.Generator().manual_seed(100 + rank)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    out = {}
    for mode in ("eval", "train"):
        task.train(mode == "train")
        for shuffle in (True, False):
            moco.shuffle_bn = shuffle
            out[f"{mode}/{'shuffled' if shuffle else 'plain'}"] = moco.encode_keys(views)
    return out
