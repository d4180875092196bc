"""Pretrained ViT-family towers loaded at another `data.image_size`: the position table is
interpolated once at load, equal to transformers' own `interpolate_pos_encoding=True` forward,
and the new size travels with the tower's config into the export."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from mmcl.config import TowerConfig
from mmcl.models import TowerLoadError, build_tower
from mmcl.models.resolution import interpolate_grid

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
AT_32_PX = {  # 8-px patches: a 4x4 grid, 6x6 at 48 px
    "vit": dict(image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ENCODER),
    "deit": dict(image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **ENCODER),
    "clip_vision_model": dict(image_size=32, patch_size=8, **ENCODER),
    "siglip_vision_model": dict(image_size=32, patch_size=8, **ENCODER),
    "dinov2": dict(image_size=32, patch_size=8, **ENCODER),
}
PREFIX_TOKENS = {"vit": 1, "deit": 2, "clip_vision_model": 1, "siglip_vision_model": 0, "dinov2": 1}


def saved_at_32_px(model_type: str, folder) -> torch.nn.Module:
    """A random-init tower with a non-trivial position table, saved with save_pretrained; returns it (eval)."""
    torch.manual_seed(0)
    tower = AutoModel.from_config(AutoConfig.for_model(model_type, **AT_32_PX[model_type])).eval()
    tower.save_pretrained(folder)
    return tower


def pixels(size: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def position_table(tower) -> torch.Tensor:
    """[T, D] whatever the tower keeps it as."""
    for module in tower.modules():
        if isinstance(getattr(module, "position_embeddings", None), torch.nn.Parameter):
            return module.position_embeddings[0]
        if isinstance(getattr(module, "position_embedding", None), torch.nn.Embedding):
            return module.position_embedding.weight
    raise AssertionError("no position table")


@pytest.mark.parametrize("model_type", ["vit", "deit", "clip_vision_model", "siglip_vision_model"])
def test_tower_loaded_at_48_px_equals_transformers_interpolate_pos_encoding_forward(tmp_path, model_type):
    original = saved_at_32_px(model_type, tmp_path)
    resized = build_tower(TowerConfig(name_or_path=str(tmp_path)), "image", image_size=48).eval()
    assert resized.config.image_size == 48
    assert position_table(resized).shape[0] == PREFIX_TOKENS[model_type] + 36
    with torch.no_grad():
        expected = original(pixel_values=pixels(), interpolate_pos_encoding=True).last_hidden_state
        got = resized(pixel_values=pixels()).last_hidden_state  # no interpolation at run time
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # prefix tokens (class, distillation) keep their rows exactly
    prefix = PREFIX_TOKENS[model_type]
    assert torch.equal(position_table(resized)[:prefix], position_table(original)[:prefix])


def test_dinov2_table_is_the_reference_bicubic_interpolation(tmp_path):
    """DINOv2 interpolates with a scale factor of its own at run time; at load it gets the reference grid."""
    original = saved_at_32_px("dinov2", tmp_path)
    resized = build_tower(TowerConfig(name_or_path=str(tmp_path)), "image", image_size=48).eval()
    table = position_table(original)
    reference = torch.cat([table[:1], F.interpolate(table[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(6, 6),
                                                    mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 32)])
    torch.testing.assert_close(position_table(resized), reference, rtol=0, atol=0)
    assert resized.config.image_size == 48 and resized(pixel_values=pixels()).last_hidden_state.shape == (2, 37, 32)


@pytest.mark.parametrize("model_type", ["vit", "clip_vision_model"])
def test_resized_tower_saved_and_reloaded_by_plain_transformers_gives_the_same_features(tmp_path, model_type):
    saved_at_32_px(model_type, tmp_path / "at32")
    resized = build_tower(TowerConfig(name_or_path=str(tmp_path / "at32")), "image", image_size=48).eval()
    resized.save_pretrained(tmp_path / "at48")
    reloaded = AutoModel.from_pretrained(tmp_path / "at48").eval()
    assert reloaded.config.image_size == 48
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels()).last_hidden_state,
                                   resized(pixel_values=pixels()).last_hidden_state, rtol=0, atol=0)


def test_same_size_inline_configs_and_convnets_are_left_as_they_are(tmp_path):
    original = saved_at_32_px("vit", tmp_path / "vit")
    same = build_tower(TowerConfig(name_or_path=str(tmp_path / "vit")), "image", image_size=32)
    assert torch.equal(position_table(same), position_table(original))
    inline = build_tower(TowerConfig(config=dict(model_type="vit", **AT_32_PX["vit"])), "image", image_size=48)
    assert inline.config.image_size == 32  # random init: the inline config says what to build
    convnext = AutoModel.from_config(AutoConfig.for_model("convnext", num_stages=2, hidden_sizes=[16, 24], depths=[1, 1]))
    convnext.save_pretrained(tmp_path / "convnext")
    loaded = build_tower(TowerConfig(name_or_path=str(tmp_path / "convnext")), "image", image_size=48)
    assert loaded(pixel_values=pixels()).pooler_output.shape == (2, 24)


def test_image_size_that_is_not_a_whole_number_of_patches_is_one_sentence_error(tmp_path):
    saved_at_32_px("vit", tmp_path)
    with pytest.raises(TowerLoadError, match=r"'data.image_size' = 44 is not a multiple of the 'model.image' tower's patch size 8"):
        build_tower(TowerConfig(name_or_path=str(tmp_path)), "image", image_size=44)


def test_interpolating_to_the_same_grid_is_the_identity():
    table = torch.randn(1 + 16, 8)
    torch.testing.assert_close(interpolate_grid(table, 1, 4), table, rtol=0, atol=1e-6)


def test_export_of_a_tower_trained_at_a_new_size_reloads_in_plain_transformers_with_equal_embeddings(tmp_path):
    """CLIP towers (an exact CLIPModel export): image tower from a 32-px checkpoint, run at 48 px."""
    from mmcl.config import DataConfig, ModelConfig, RunConfig, TextTowerConfig
    from mmcl.export import export_model
    from mmcl.models import build_model, build_tokenizer

    tokenizer_dir = _word_tokenizer(tmp_path / "tokenizer")
    saved_at_32_px("clip_vision_model", tmp_path / "vision32")
    text = dict(model_type="clip_text_model", vocab_size=64, max_position_embeddings=16, **ENCODER)
    config = RunConfig(
        model=ModelConfig(image=TowerConfig(name_or_path=str(tmp_path / "vision32"), pooling="pooler_output"),
                          text=TextTowerConfig(config=text, tokenizer=str(tokenizer_dir), context_length=12, pooling="eos"),
                          embed_dim=24),
        data=DataConfig(image_size=48, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    )
    torch.manual_seed(0)
    model = build_model(config.model, image_size=config.data.image_size).eval()
    out = export_model(model, config, build_tokenizer(config.model.text), tmp_path / "export")

    exported = json.loads((out / "config.json").read_text())
    assert exported["vision_config"]["image_size"] == 48
    assert json.loads((out / "mmcl_export.json").read_text())["image"]["exact"]
    hf = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        image = F.normalize(hf.get_image_features(pixel_values=pixels()).pooler_output, dim=-1)
        torch.testing.assert_close(image, model.encode_image(pixels()), rtol=0, atol=1e-5)


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", "a", "photo", "of", "digit"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder
