"""Patch dropout (FLIP): which tokens are kept, where positions are added, when it applies."""
from __future__ import annotations

import copy

import pytest
import torch

from mmcl.config import ConfigError, TowerConfig, from_dict
from mmcl.engine.rng import capture_rng, restore_rng
from mmcl.models import DualEncoder, build_tower
from mmcl.models.patch_dropout import (attach_patch_dropout, drop_patches, kept_count, keep_indices,
                                       patch_dropout_active, patch_dropout_hooks, set_patch_dropout)

from .tiny import IMAGE_CONFIGS, image_batch, model_config

_TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# model type -> (extra config, prefix tokens the tower must keep: class, distillation, registers)
FAMILIES = {
    "vit": (_NO_DROPOUT, 1),
    "deit": (_NO_DROPOUT, 2),
    "clip_vision_model": ({}, 1),
    "siglip_vision_model": ({}, 0),
    "dinov2": (_NO_DROPOUT, 1),
    "dinov2_with_registers": ({**_NO_DROPOUT, "num_register_tokens": 4}, 5),
}
PATCHES = (32 // 8) ** 2


def tower_with_patch_dropout(family: str, p: float = 0.5):
    extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(config=dict(model_type=family, **_TINY, **extra)), "image")
    return tower, attach_patch_dropout(tower, p)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_tower_sees_prefix_plus_kept_patches_and_eval_sees_all(family):
    tower, hook = tower_with_patch_dropout(family, p=0.5)
    prefix = FAMILIES[family][1]
    assert hook.prefix_tokens == prefix
    pixels = image_batch(3)
    assert tower.train()(pixel_values=pixels).last_hidden_state.shape[1] == prefix + PATCHES // 2
    assert tower.eval()(pixel_values=pixels).last_hidden_state.shape[1] == prefix + PATCHES


def test_each_image_keeps_its_prefix_and_a_distinct_subset_of_its_own_patches():
    torch.manual_seed(3)
    prefix, patches, width = 2, 49, 5
    tokens = torch.randn(4, prefix + patches, width)
    out = drop_patches(tokens, 0.75, prefix)
    assert out.shape == (4, prefix + round(0.25 * patches), width)  # round((1 - p) * N) = 12
    torch.testing.assert_close(out[:, :prefix], tokens[:, :prefix])
    chosen = []
    for row in range(4):
        # every kept token is one of this image's patch tokens, each at most once, in their original order
        match = (out[row, prefix:, None, :] == tokens[row, None, prefix:, :]).all(-1)
        assert (match.sum(1) == 1).all()
        index = match.float().argmax(1)
        assert (index.diff() > 0).all()
        chosen.append(tuple(index.tolist()))
    assert len(set(chosen)) == 4  # images draw independently


def test_kept_count_rounds_and_keeps_at_least_one():
    assert kept_count(196, 0.5) == 98 and kept_count(196, 0.75) == 49 and kept_count(4, 0.99) == 1
    assert keep_indices(2, 196, 0.5).shape == (2, 98)


def test_vit_output_equals_layers_run_on_gathered_tokens_with_positions_added_before_dropping():
    tower, hook = tower_with_patch_dropout("vit", p=0.5)
    tower.train()
    pixels = image_batch(2)
    torch.manual_seed(11)
    got = tower(pixel_values=pixels).last_hidden_state
    # by hand: patch embeddings, class token, position embeddings for all 17 positions, then the gather
    emb = tower.embeddings
    patches = emb.patch_embeddings(pixels)  # [B, N, D]
    tokens = torch.cat([emb.cls_token.expand(2, -1, -1), patches], dim=1) + emb.position_embeddings
    torch.manual_seed(11)
    index = keep_indices(2, PATCHES, 0.5)
    kept = torch.stack([tokens[b, 1:][index[b]] for b in range(2)])
    hidden = torch.cat([tokens[:, :1], kept], dim=1)
    for layer in (tower.layers if hasattr(tower, "layers") else tower.encoder.layer):  # transformers 5 / 4
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    expected = tower.layernorm(hidden)
    torch.testing.assert_close(got, expected)


def test_clip_vision_output_equals_layers_run_on_gathered_tokens_with_positions_added_before_dropping():
    tower, hook = tower_with_patch_dropout("clip_vision_model", p=0.5)
    tower.train()
    pixels = image_batch(2)
    torch.manual_seed(5)
    got = tower(pixel_values=pixels)
    vision = getattr(tower, "vision_model", tower)  # transformers 4 nests the transformer, 5 does not
    emb = vision.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    tokens = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], dim=1) + emb.position_embedding.weight
    torch.manual_seed(5)
    index = keep_indices(2, PATCHES, 0.5)
    kept = torch.stack([tokens[b, 1:][index[b]] for b in range(2)])
    hidden = vision.encoder(inputs_embeds=vision.pre_layrnorm(torch.cat([tokens[:, :1], kept], dim=1)))
    expected = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    torch.testing.assert_close(got.last_hidden_state, expected)
    torch.testing.assert_close(got.pooler_output, vision.post_layernorm(expected[:, 0]))


def test_restored_rng_state_keeps_the_same_tokens():
    """What feature-cache re-encoding and resume rely on: same RNG state, same kept tokens."""
    tower, _ = tower_with_patch_dropout("vit", p=0.5)
    tower.train()
    pixels = image_batch(4)
    state = capture_rng()
    first = tower(pixel_values=pixels).last_hidden_state
    second = tower(pixel_values=pixels).last_hidden_state
    restore_rng(state)
    replay = tower(pixel_values=pixels).last_hidden_state
    assert not torch.equal(first, second)
    assert torch.equal(first, replay)


def test_eval_mode_sees_every_token_and_the_model_is_initialised_as_without_patch_dropout():
    torch.manual_seed(0)
    plain = DualEncoder.from_config(model_config(text=None))
    torch.manual_seed(0)
    dropped = DualEncoder.from_config(model_config(text=None, image_patch_dropout=0.5))
    for (name, a), b in zip(plain.state_dict().items(), dropped.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    pixels = image_batch(3)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped.encode_image(pixels), plain.encode_image(pixels))
    plain.train(), dropped.train()
    assert not torch.allclose(dropped.encode_image(pixels), plain.encode_image(pixels))


def test_switched_off_hooks_see_every_token_including_deep_copies():
    torch.manual_seed(0)
    model = DualEncoder.from_config(model_config(text=None, image_patch_dropout=0.5))
    target = copy.deepcopy(model.image_tower)  # e.g. an EMA target
    holder = torch.nn.ModuleList([model, target])
    assert set_patch_dropout(holder, False) == 2
    assert all(not hook.active for hook in patch_dropout_hooks(holder))
    plain = DualEncoder.from_config(model_config(text=None))
    plain.load_state_dict(model.state_dict())
    pixels = image_batch(2)
    torch.testing.assert_close(model.train().encode_image(pixels), plain.train().encode_image(pixels))


def test_tower_locked_below_its_last_layer_still_drops_tokens_in_training():
    torch.manual_seed(0)
    model = DualEncoder.from_config(model_config(text=None, image_patch_dropout=0.5, image_lock=True,
                                                 image_unlocked_layers=1)).train()
    assert not model.image_tower.embeddings.training  # frozen, so kept in eval mode
    tokens = model.image_tower(pixel_values=image_batch(2)).last_hidden_state.shape[1]
    assert tokens == 1 + (32 // 8) ** 2 // 2


def test_unmasked_finish_covers_exactly_the_last_steps():
    active = [patch_dropout_active(done, 10, 3) for done in range(10)]  # done = steps completed before this one
    assert active == [True] * 7 + [False] * 3
    assert all(patch_dropout_active(done, 10, 0) for done in range(10))
    assert not any(patch_dropout_active(done, 10, 20) for done in range(10))


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_patch_dropout_on_a_feature_map_tower_is_a_build_error(family):
    config = IMAGE_CONFIGS.get(family, dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    cfg = model_config(text=None, image_patch_dropout=0.5)
    cfg.image.config = dict(config)
    with pytest.raises(ValueError, match=r"^'model.image.patch_dropout' needs an image tower whose embeddings give a "
                                         r"token sequence .* set it to 0\.$"):
        DualEncoder.from_config(cfg)


def _raw(**image):
    return {"model": {"image": {"config": {"model_type": "vit"}, **image},
                      "text": {"config": {"model_type": "bert"}, "tokenizer": "unused"}},
            "objectives": {"clip": 1.0}}


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_patch_dropout_outside_zero_to_one_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"'model.image.patch_dropout' must be in \[0, 1\)"):
        from_dict(_raw(patch_dropout=value))


def test_patch_dropout_on_the_text_tower_and_negative_final_steps_are_config_errors():
    raw = _raw()
    raw["model"]["text"]["patch_dropout"] = 0.5
    with pytest.raises(ConfigError, match="'model.text.patch_dropout' applies to image towers only"):
        from_dict(raw)
    raw = _raw(patch_dropout=0.5)
    raw["train"] = {"patch_dropout_final_steps": -1}
    with pytest.raises(ConfigError, match="'train.patch_dropout_final_steps' must be >= 0"):
        from_dict(raw)
    with pytest.raises(ConfigError, match="'model.image.patch_dropout' has no effect on a fully locked tower"):
        from_dict(_raw(patch_dropout=0.5, lock=True))
    assert from_dict(_raw(patch_dropout=0.5)).model.image.patch_dropout == 0.5
