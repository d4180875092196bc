"""The sizes a run derives (mmcl.engine.sizes) are what the DeepSpeed config, the saved layout and the run use."""
from types import SimpleNamespace

import pytest

from mmcl.config import from_dict
from mmcl.engine.ds_config import build_deepspeed_config
from mmcl.engine.elastic import current_layout
from mmcl.engine.runtime import TrainingError
from mmcl.engine.sizes import global_batch, steps_per_epoch

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}


def run_config(micro: int, accum: int):
    return from_dict({"model": {"image": {"config": VIT, "pooling": "cls", "projection": "none"}, "embed_dim": 32},
                      "objectives": {"simclr": 1.0}, "train": {"micro_batch_size": micro, "grad_accum_steps": accum}})


def test_the_global_batch_is_micro_batch_times_accumulation_times_ranks_in_the_deepspeed_config_and_the_layout():
    cfg = run_config(micro=4, accum=2)
    assert global_batch(4, 2, 3) == 24
    assert build_deepspeed_config(cfg, 3, {})["train_batch_size"] == 24
    assert current_layout(cfg, 3, 3)["global_batch"] == 24


def test_an_epoch_is_the_loaders_micro_batches_over_the_accumulation_steps():
    cfg = run_config(micro=4, accum=3)
    assert steps_per_epoch(SimpleNamespace(steps_per_epoch=10), cfg) == 3
    with pytest.raises(TrainingError, match="the epoch length is unknown"):
        steps_per_epoch(SimpleNamespace(steps_per_epoch=None), cfg)
