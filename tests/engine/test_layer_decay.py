"""Layer-wise learning-rate decay (`optim.layer_decay`): depth from each tower's module structure."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from mmcl.engine.optim import parameter_groups
from mmcl.engine.settings import OptimConfig
from mmcl.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny import model_config  # noqa: E402

# (image family, text family, where each tower's layer stack lives)
PAIRS = [("vit", "bert"), ("clip_vision_model", "clip_text_model"), ("convnext", "t5")]
STACKS = {"vit": "layers", "clip_vision_model": "encoder.layers", "convnext": "encoder.stages", "bert": "encoder.layer",
          "clip_text_model": "encoder.layers", "t5": "encoder.block"}
EMBEDDING_PARTS = ("embed", "pre_layrnorm", "shared")  # what precedes the stack in these towers


def expected_depth(name: str, stack: str, layers: int) -> int:
    match = re.match(rf"{re.escape(stack)}\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if any(part in name for part in EMBEDDING_PARTS) else layers + 1


def group_lrs(model, cfg: OptimConfig) -> dict[str, float]:
    """parameter name -> the lr of the group holding it."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)]: group["lr"] for group in parameter_groups(model, cfg) for p in group["params"]}


@pytest.mark.parametrize("image, text", PAIRS)
def test_each_layer_gets_lr_times_decay_to_its_distance_from_the_top_and_embeddings_the_deepest(image, text):
    torch.manual_seed(0)
    model = build_model(model_config(image, text))
    cfg = OptimConfig(lr=1e-3, image_lr=2e-4, text_lr=1e-4, layer_decay=0.5, text_layer_decay=0.8)
    lrs = group_lrs(model, cfg)
    for side, family, tower_lr, decay in (("image", image, 2e-4, 0.5), ("text", text, 1e-4, 0.8)):
        tower = getattr(model, f"{side}_tower")
        layers = len(tower.get_submodule(STACKS[family]))
        depths = set()
        for name, _ in tower.named_parameters():
            depth = expected_depth(name, STACKS[family], layers)
            depths.add(depth)
            assert lrs[f"{side}_tower.{name}"] == pytest.approx(tower_lr * decay ** (layers + 1 - depth)), (name, depth)
        assert depths >= set(range(0, layers + 1))  # embeddings and every layer present
    for name in ("image_projection.weight", "text_projection.weight", "logit_scale"):
        assert lrs[name] == 1e-3  # heads and logit scale keep the full lr


def test_vit_bert_groups_are_named_by_depth_and_decay_stays_off_by_default():
    torch.manual_seed(0)
    model = build_model(model_config("vit", "bert"))
    groups = parameter_groups(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    names = {group["name"]: group["lr"] for group in groups}
    assert names["image_tower/depth_0/no_decay"] == pytest.approx(1e-3 * 0.5 ** 3)  # embeddings of 2 layers
    assert names["image_tower/depth_1/decay"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert names["image_tower/depth_2/decay"] == pytest.approx(1e-3 * 0.5)
    assert names["image_tower/depth_3/no_decay"] == pytest.approx(1e-3)  # final layernorm
    assert names["heads/decay"] == 1e-3
    plain = {group["name"] for group in parameter_groups(model, OptimConfig(lr=1e-3))}
    assert plain == {"image_tower/decay", "image_tower/no_decay", "text_tower/decay", "text_tower/no_decay",
                     "heads/decay", "heads/no_decay"}


def test_layer_decay_applies_to_lora_adapters_by_their_layer():
    from mmcl.models.settings import LoraConfig

    torch.manual_seed(0)
    model = build_model(model_config("vit", "bert", image_lora=LoraConfig(rank=2)))
    lrs = group_lrs(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    assert lrs["image_tower.layers.0.attention.q_proj.lora_A.default.weight"] == pytest.approx(1e-3 * 0.25)
    assert lrs["image_tower.layers.1.attention.v_proj.lora_B.default.weight"] == pytest.approx(1e-3 * 0.5)
    assert not any("image_tower" in name and "lora_" not in name for name in lrs)  # the frozen base has no group


def test_layer_decay_outside_0_1_is_refused_in_one_sentence():
    from mmcl.config import ConfigError, from_dict

    raw = {"model": {"image": {"config": {"model_type": "vit"}}}, "objectives": {"simclr": 1.0},
           "data": {"train_shards": "x.tar"}, "optim": {"layer_decay": 1.5}}
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        from_dict(raw)
