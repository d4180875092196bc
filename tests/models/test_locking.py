import pytest
import torch

from mmcl.config import TextTowerConfig, TowerConfig
from mmcl.models import DualEncoder, build_tower, find_layer_stack, lock_tower

from .tiny import IMAGE_CONFIGS, TEXT_CONFIGS, image_batch, model_config, text_batch

STACKS = {
    "vit": {"layers", "encoder.layer"},  # transformers 5 moved ViT's layers to the top level
    "clip_vision_model": {"encoder.layers"},
    "convnext": {"encoder.stages"},
    "bert": {"encoder.layer"},
    "roberta": {"encoder.layer"},
    "clip_text_model": {"encoder.layers"},
    "t5": {"encoder.block"},
}


@pytest.mark.parametrize("family", sorted(STACKS))
def test_layer_stack_is_the_largest_module_list(family):
    kind = "image" if family in IMAGE_CONFIGS else "text"
    config = dict((IMAGE_CONFIGS if kind == "image" else TEXT_CONFIGS)[family])
    tower = build_tower(TowerConfig(config=config), kind)
    name, stack = find_layer_stack(tower)
    assert name in STACKS[family] and len(stack) == 2


def _backward(model):
    input_ids, attention_mask = text_batch()
    out = model(pixel_values=image_batch(), input_ids=input_ids, attention_mask=attention_mask)
    (out["image_features"] @ out["text_features"].T).sum().backward()


def test_unlocked_last_layer_and_final_norms_get_gradients_and_the_rest_none():
    model = DualEncoder.from_config(
        model_config(
            image="clip_vision_model", text="t5", image_lock=True, image_unlocked_layers=1,
            text_lock=True, text_unlocked_layers=1,
        )
    )
    _backward(model)
    trainable_prefixes = {
        "image_tower": ("encoder.layers.1.", "post_layernorm."),
        "text_tower": ("encoder.block.1.", "encoder.final_layer_norm."),
    }
    for side, prefixes in trainable_prefixes.items():
        for name, parameter in getattr(model, side).named_parameters():
            if name.startswith(prefixes):
                assert parameter.requires_grad and parameter.grad is not None, name
                assert parameter.grad.abs().sum() > 0, name
            else:
                assert not parameter.requires_grad and parameter.grad is None, name
    assert model.image_projection.weight.grad is not None and model.text_projection.weight.grad is not None


def test_unlocking_every_layer_keeps_only_the_embeddings_frozen():
    tower = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS["bert"])), "text")
    lock_tower(tower, 2, "model.text")
    frozen = {name for name, p in tower.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("embeddings.") for name in frozen)


def test_full_lock_freezes_the_tower_and_keeps_it_in_eval_mode():
    model = DualEncoder.from_config(model_config(image_lock=True))
    model.eval().train()
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    assert not any(m.training for m in model.image_tower.modules())
    assert model.training and model.image_projection.training and model.text_tower.training
    assert model.logit_scale.requires_grad


def test_partial_lock_keeps_frozen_layers_in_eval_and_unlocked_in_train():
    model = DualEncoder.from_config(model_config(text="bert", text_lock=True, text_unlocked_layers=1))
    model.train()
    layers = model.text_tower.encoder.layer
    assert not layers[0].training and not model.text_tower.embeddings.training
    assert layers[1].training and layers[1].output.dropout.training


def test_dropout_is_off_in_frozen_towers_during_training():
    dropout = dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    input_ids, attention_mask = text_batch()

    def two_forwards(lock: bool):
        cfg = model_config(text="bert", text_lock=lock)
        cfg.text.config.update(dropout)
        model = DualEncoder.from_config(cfg).train()
        return model.encode_text(input_ids, attention_mask), model.encode_text(input_ids, attention_mask)

    first, second = two_forwards(lock=True)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first, second = two_forwards(lock=False)
    assert not torch.allclose(first, second)  # the same config does apply dropout when trainable


def test_more_unlocked_layers_than_the_tower_has_is_refused():
    with pytest.raises(ValueError, match=r"'model.image.unlocked_layers' = 3 but the tower's layer stack '.*' has only 2 layers"):
        DualEncoder.from_config(model_config(image_lock=True, image_unlocked_layers=3))
