import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel, T5EncoderModel, ViTConfig, ViTModel

from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig
from mmcl.models import DualEncoder, TowerLoadError, build_tower, resolve_pooling

from .tiny import EMBED_DIM, IMAGE_CONFIGS, TEXT_CONFIGS, image_batch, model_config, text_batch

IMAGE_AUTO = {"vit": "cls", "clip_vision_model": "pooler_output", "convnext": "pooler_output"}
TEXT_AUTO = {"bert": "pooler_output", "roberta": "pooler_output", "clip_text_model": "eos", "t5": "mean"}


@pytest.mark.parametrize("family", sorted(IMAGE_CONFIGS))
def test_image_family_builds_pools_projects_to_unit_rows(family):
    torch.manual_seed(0)
    model = DualEncoder.from_config(model_config(image=family, text=None)).eval()
    assert model.image_tower.config.model_type == family
    assert model.image_pooling == IMAGE_AUTO[family]
    features = model.encode_image(image_batch(3))
    assert features.shape == (3, EMBED_DIM)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    raw = model.encode_image(image_batch(3), normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), features)


@pytest.mark.parametrize("family", sorted(TEXT_CONFIGS))
def test_text_family_builds_pools_projects_to_unit_rows(family):
    torch.manual_seed(0)
    model = DualEncoder.from_config(model_config(text=family)).eval()
    assert model.text_tower.config.model_type == family
    assert model.text_pooling == TEXT_AUTO[family]
    input_ids, attention_mask = text_batch()
    features = model.encode_text(input_ids, attention_mask)
    assert features.shape == (2, EMBED_DIM)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


def test_t5_text_tower_is_the_encoder_only():
    tower = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS["t5"])), "text")
    assert type(tower) is T5EncoderModel


def test_model_class_picks_the_class_and_auto_pools_its_embeds():
    config = dict(IMAGE_CONFIGS["clip_vision_model"], projection_dim=EMBED_DIM)
    tower_cfg = TowerConfig(config=config, model_class="CLIPVisionModelWithProjection", projection="none")
    tower = build_tower(tower_cfg, "image")
    assert type(tower).__name__ == "CLIPVisionModelWithProjection"
    assert resolve_pooling(tower, "image") == "embeds"
    model = DualEncoder.from_config(ModelConfig(image=tower_cfg, embed_dim=EMBED_DIM)).eval()
    pixels = image_batch()
    expected = torch.nn.functional.normalize(model.image_tower(pixel_values=pixels).image_embeds, dim=-1)
    torch.testing.assert_close(model.encode_image(pixels), expected)


def test_attn_implementation_is_passed_through():
    tower = build_tower(TowerConfig(config=dict(IMAGE_CONFIGS["vit"]), attn_implementation="eager"), "image")
    assert tower.config._attn_implementation == "eager"


def test_tower_loads_from_local_directory_with_the_saved_weights(tmp_path):
    torch.manual_seed(0)
    config = dict(IMAGE_CONFIGS["vit"])
    config.pop("model_type")
    saved = ViTModel(ViTConfig(**config)).eval()
    saved.save_pretrained(tmp_path / "vit")
    tower = build_tower(TowerConfig(name_or_path=str(tmp_path / "vit")), "image").eval()
    assert type(tower) is ViTModel and tower.dtype == torch.float32
    pixels = image_batch()
    torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, saved(pixel_values=pixels).last_hidden_state)


def test_text_tower_loads_from_local_directory_with_the_saved_weights(tmp_path):
    torch.manual_seed(0)
    saved = build_tower(TextTowerConfig(config=dict(TEXT_CONFIGS["t5"])), "text").eval()
    saved.save_pretrained(tmp_path / "t5")
    tower = build_tower(TextTowerConfig(name_or_path=str(tmp_path / "t5")), "text").eval()
    input_ids, attention_mask = text_batch()
    torch.testing.assert_close(
        tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
        saved(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
    )


def test_two_tower_clip_checkpoint_gives_the_matching_single_tower(tmp_path):
    torch.manual_seed(0)
    vision = {k: v for k, v in IMAGE_CONFIGS["clip_vision_model"].items() if k != "model_type"}
    text = {k: v for k, v in TEXT_CONFIGS["clip_text_model"].items() if k != "model_type"}
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=EMBED_DIM)).eval()
    clip.save_pretrained(tmp_path / "clip")
    tower = build_tower(TowerConfig(name_or_path=str(tmp_path / "clip")), "image").eval()
    assert type(tower) is CLIPVisionModel
    pixels = image_batch()
    torch.testing.assert_close(tower(pixel_values=pixels).pooler_output, clip.vision_model(pixel_values=pixels).pooler_output)
    text_tower = build_tower(TextTowerConfig(name_or_path=str(tmp_path / "clip")), "text").eval()
    assert type(text_tower) is CLIPTextModel
    input_ids, attention_mask = text_batch()
    torch.testing.assert_close(
        text_tower(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
        clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output,
    )


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message


def test_missing_directory_names_the_key_and_value(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(TowerLoadError) as caught:
        build_tower(TowerConfig(name_or_path=missing), "image")
    message = str(caught.value)
    assert "'model.image.name_or_path'" in message and missing in message and _one_sentence(message)


def test_unknown_model_type_names_the_config_key():
    with pytest.raises(TowerLoadError, match=r"'model.text.config' \(model_type 'not_a_model'\)"):
        build_tower(TextTowerConfig(config={"model_type": "not_a_model"}), "text")


def test_unknown_model_class_names_the_key():
    with pytest.raises(TowerLoadError, match=r"'model.image.model_class' = 'NoSuchModel'"):
        build_tower(TowerConfig(config=dict(IMAGE_CONFIGS["vit"]), model_class="NoSuchModel"), "image")


def test_text_model_as_image_tower_is_refused():
    with pytest.raises(TowerLoadError, match=r"'model.image' gives BertModel, which takes input_ids rather than pixel_values"):
        build_tower(TowerConfig(config=dict(TEXT_CONFIGS["bert"])), "image")


def test_checkpoint_without_weights_for_the_class_is_refused(tmp_path):
    build_tower(TowerConfig(config=dict(IMAGE_CONFIGS["vit"])), "image").save_pretrained(tmp_path / "vit")
    with pytest.raises(TowerLoadError, match=r"has no weights for most of CLIPVisionModel \(e.g. "):
        build_tower(TowerConfig(name_or_path=str(tmp_path / "vit"), model_class="CLIPVisionModel"), "image")


def test_context_length_beyond_position_table_is_refused():
    with pytest.raises(ValueError, match=r"'model.text.context_length' = 33 exceeds the text tower's 32 positions"):
        DualEncoder.from_config(model_config(text="roberta", text_context_length=33))
    assert DualEncoder.from_config(model_config(text="roberta", text_context_length=32)).text_tower is not None


def test_embeds_pooling_without_a_projection_class_is_refused():
    with pytest.raises(ValueError, match=r"'model.image.pooling': pooling 'embeds' needs a \*WithProjection tower class"):
        DualEncoder.from_config(model_config(image="clip_vision_model", text=None, image_pooling="embeds"))
