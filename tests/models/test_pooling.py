import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmcl.config import TextTowerConfig, TowerConfig
from mmcl.models import build_tower, pool, pooled_width, resolve_pooling

from .tiny import IMAGE_CONFIGS, TEXT_CONFIGS, image_batch, text_batch


def _text_outputs(family: str):
    torch.manual_seed(0)
    tower = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS[family])), "text").eval()
    input_ids, attention_mask = text_batch()
    return tower(input_ids=input_ids, attention_mask=attention_mask), input_ids, attention_mask


def test_mean_pooling_averages_only_unmasked_tokens():
    outputs, _, mask = _text_outputs("bert")
    hidden = outputs.last_hidden_state
    expected = torch.stack([hidden[0, :5].mean(0), hidden[1, :12].mean(0)])
    torch.testing.assert_close(pool(outputs, "mean", "text", mask), expected)


def test_eos_pooling_takes_the_last_unmasked_token():
    outputs, _, mask = _text_outputs("bert")
    hidden = outputs.last_hidden_state
    torch.testing.assert_close(pool(outputs, "eos", "text", mask), torch.stack([hidden[0, 4], hidden[1, 11]]))


def test_eos_pooling_works_with_left_padding_too():
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    pooled = pool(BaseModelOutputWithPooling(last_hidden_state=hidden), "eos", "text", mask)
    torch.testing.assert_close(pooled, torch.stack([hidden[0, 5], hidden[1, 2]]))


def test_eos_pooling_matches_clip_text_pooler_output():
    outputs, _, mask = _text_outputs("clip_text_model")  # its rows end in eos_token_id = 3
    torch.testing.assert_close(pool(outputs, "eos", "text", mask), outputs.pooler_output)


def test_cls_pooling_takes_the_first_token():
    outputs, _, mask = _text_outputs("roberta")
    torch.testing.assert_close(pool(outputs, "cls", "text", mask), outputs.last_hidden_state[:, 0])


def test_conv_map_mean_pools_over_height_and_width():
    tower = build_tower(TowerConfig(config=dict(IMAGE_CONFIGS["convnext"])), "image").eval()
    outputs = tower(pixel_values=image_batch())
    assert outputs.last_hidden_state.shape == (2, 24, 4, 4)
    torch.testing.assert_close(pool(outputs, "mean", "image"), outputs.last_hidden_state.mean(dim=(2, 3)))
    assert pool(outputs, "pooler_output", "image").shape == (2, 24)
    with pytest.raises(ValueError, match="4D feature map; use mean"):
        pool(outputs, "cls", "image")


def test_unknown_image_model_falls_back_on_its_outputs():
    swin = {"model_type": "swin", "embed_dim": 8, "depths": [1], "num_heads": [2], "image_size": 32, "window_size": 4}
    assert resolve_pooling(build_tower(TowerConfig(config=swin), "image"), "image") == "auto"
    tokens = torch.randn(2, 5, 4)
    with_pooler = BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=torch.randn(2, 4, 1, 1))
    torch.testing.assert_close(pool(with_pooler, "auto", "image"), with_pooler.pooler_output.flatten(1))
    torch.testing.assert_close(pool(BaseModelOutputWithPooling(last_hidden_state=tokens), "auto", "image"), tokens[:, 0])
    conv = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(pool(BaseModelOutputWithPooling(last_hidden_state=conv), "auto", "image"), conv.mean(dim=(2, 3)))


def test_pooler_output_missing_is_a_clear_error():
    outputs, _, mask = _text_outputs("t5")
    with pytest.raises(ValueError, match="needs a tower that returns pooler_output"):
        pool(outputs, "pooler_output", "text", mask)


def test_explicit_pooling_overrides_auto():
    tower = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS["bert"])), "text")
    assert resolve_pooling(tower, "text", "mean") == "mean"
    assert resolve_pooling(tower, "text") == "pooler_output"  # BERT's pooler: what transformers exports


def test_pooled_width_of_each_kind_of_config():
    convnext = build_tower(TowerConfig(config=dict(IMAGE_CONFIGS["convnext"])), "image")
    assert pooled_width(convnext, "pooler_output") == 24
    t5 = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS["t5"])), "text")
    assert pooled_width(t5, "mean") == 32
    config = dict(IMAGE_CONFIGS["clip_vision_model"], projection_dim=8)
    with_projection = build_tower(TowerConfig(config=config, model_class="CLIPVisionModelWithProjection"), "image")
    assert pooled_width(with_projection, "embeds") == 8
