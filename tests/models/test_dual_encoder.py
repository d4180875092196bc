import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.models import DualEncoder, build_model

from .tiny import EMBED_DIM, image_batch, model_config, text_batch


def test_logit_scale_starts_at_one_over_0_07_stored_as_log():
    model = build_model(model_config())
    assert isinstance(model, DualEncoder)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model()["logit_scale"].item() == pytest.approx(1 / 0.07)


def test_logit_scale_is_clamped_to_100_in_forward():
    model = build_model(model_config())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model()["logit_scale"].item() == pytest.approx(100.0)
    assert model.logit_scale.item() == pytest.approx(math.log(1000.0))  # the parameter itself is untouched


def test_logit_bias_only_when_configured():
    model = build_model(model_config())
    assert model.logit_bias is None and "logit_bias" not in model()
    model = build_model(model_config(logit_bias_init=-10.0))
    assert model()["logit_bias"].item() == -10.0 and model.logit_bias.requires_grad


def test_forward_returns_features_for_the_inputs_given():
    model = build_model(model_config()).eval()
    input_ids, attention_mask = text_batch()
    out = model(pixel_values=image_batch(), input_ids=input_ids, attention_mask=attention_mask)
    assert out["image_features"].shape == out["text_features"].shape == (2, EMBED_DIM)
    torch.testing.assert_close(out["image_features"], model.encode_image(image_batch()))
    torch.testing.assert_close(out["text_features"], model.encode_text(input_ids, attention_mask))
    assert set(model(pixel_values=image_batch())) == {"image_features", "logit_scale"}


def test_image_only_model_has_no_text_side():
    model = build_model(model_config(text=None))
    assert model.text_tower is None and model.text_projection is None
    with pytest.raises(ValueError, match="no text tower"):
        model.encode_text(torch.zeros(1, 4, dtype=torch.long))


def test_parameter_names_group_by_tower_and_head():
    model = build_model(model_config())
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == {"image_tower", "image_projection", "text_tower", "text_projection", "logit_scale"}


def _clip_loss_gradients(model):
    input_ids, attention_mask = text_batch()
    out = model(pixel_values=image_batch(), input_ids=input_ids, attention_mask=attention_mask)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(2)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(model_config()).train()
    checkpointed = build_model(model_config(image_gradient_checkpointing=True, text_gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.image_tower.is_gradient_checkpointing and checkpointed.text_tower.is_gradient_checkpointing
    expected, actual = _clip_loss_gradients(plain), _clip_loss_gradients(checkpointed)
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_gradient_checkpointing_on_a_tower_without_it_is_refused():
    with pytest.raises(ValueError, match=r"'model.image.gradient_checkpointing' is true but ConvNextModel does not support"):
        build_model(model_config(image="convnext", image_gradient_checkpointing=True))


def test_projection_none_needs_matching_width():
    with pytest.raises(ValueError, match=r"'model.image.projection' is none but the tower's pooled width is 32"):
        build_model(model_config(image_projection="none"))
    model = build_model(model_config(image_projection="none", text_projection="none", embed_dim=32)).eval()
    pixels = image_batch()
    expected = F.normalize(model.image_tower(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)  # ViT: cls
    torch.testing.assert_close(model.encode_image(pixels), expected)


def test_mlp_projection_uses_configured_hidden_width():
    model = build_model(model_config(image_projection="mlp", mlp_hidden_dim=48))
    assert model.image_projection[0].out_features == 48
    assert model.encode_image(image_batch()).shape == (2, EMBED_DIM)
