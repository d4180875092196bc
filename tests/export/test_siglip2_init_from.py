"""model.init_from a locally saved Siglip2Model: NaFlex data settings, its Gemma tokenizer, and the
first step's embeddings equal the source's get_image_features / get_text_features."""
from __future__ import annotations


import pytest
import torch
from PIL import Image
from siglip2_source import CONTEXT, MAX_PATCHES, PATCH, mixed_images, write_caption_shard, write_siglip2_source

from mmcl.config import from_dict
from mmcl.data import build_train_loader
from mmcl.models import build_tokenizer
from mmcl.pretrained import build_model

SIZES = [(40, 16), (16, 40), (32, 32), (64, 24)]
CAPTIONS = ["a photo of the digit 7", "the number 3", "a tall tree", "a wide car"]


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip2")
    return folder, write_siglip2_source(folder)


def images() -> list[Image.Image]:
    return mixed_images(SIZES)


@pytest.fixture
def shard(tmp_path):
    write_caption_shard(tmp_path, images(), CAPTIONS)
    return str(tmp_path / "00000.tar")


def test_init_from_a_siglip2_model_fills_naflex_its_normalisation_bias_and_tokenizer(siglip2_dir):
    folder, _ = siglip2_dir
    cfg = from_dict({"model": {"init_from": str(folder)}, "objectives": {"siglip": 1.0}})
    assert (cfg.data.naflex.patch_size, cfg.data.naflex.max_num_patches) == (PATCH, MAX_PATCHES)
    assert (cfg.data.image_mean, cfg.data.image_std) == ([0.4, 0.5, 0.6], [0.2, 0.3, 0.4])
    assert (cfg.model.embed_dim, cfg.model.text.context_length, cfg.model.image.projection) == (32, CONTEXT, "none")
    assert cfg.model.logit_bias_init is not None
    tokenizer = build_tokenizer(cfg.model.text)
    assert type(tokenizer).__name__ == "Siglip2Tokenizer"  # transformers' Gemma tokenizer with SigLIP 2's lowercasing
    assert tokenizer.padding_side == "left"  # as transformers pads for SigLIP 2's last-position text head
    assert tokenizer.convert_ids_to_tokens(tokenizer("The 7")["input_ids"]) == ["the", "▁", "7"]  # lowercased; no BOS added


def test_first_step_embeddings_equal_the_siglip2_sources_on_naflex_batches(siglip2_dir, shard):
    from transformers import AutoProcessor

    folder, source = siglip2_dir
    cfg = from_dict({"model": {"init_from": str(folder)}, "objectives": {"siglip": 1.0},
                     "data": {"train_shards": shard, "num_workers": 0, "shuffle_buffer": 0}})
    model = build_model(cfg.model).eval()
    tokenizer = build_tokenizer(cfg.model.text)
    batch = next(iter(build_train_loader(cfg.data, tokenizer, CONTEXT, batch_size=4, seed=0)))
    order = [int(key) for key in batch["keys"]]
    processor = AutoProcessor.from_pretrained(str(folder))
    # Siglip2Processor's class defaults (16 px patches, 256 of them, 64 tokens) win over its saved image
    # processor's settings, so they are given here
    expected = processor(images=[images()[i] for i in order], text=[CAPTIONS[i] for i in order], padding="max_length",
                         max_length=CONTEXT, truncation=True, patch_size=PATCH, max_num_patches=MAX_PATCHES,
                         return_tensors="pt")
    assert torch.equal(batch["spatial_shapes"], expected["spatial_shapes"])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    with torch.no_grad():
        ours_image = model.encode_image(batch["pixel_values"], normalize=False,
                                        pixel_attention_mask=batch["pixel_attention_mask"],
                                        spatial_shapes=batch["spatial_shapes"])
        theirs_image = source.get_image_features(pixel_values=expected["pixel_values"],
                                                 pixel_attention_mask=expected["pixel_attention_mask"],
                                                 spatial_shapes=expected["spatial_shapes"]).pooler_output
        ours_text = model.encode_text(batch["input_ids"], batch["attention_mask"], normalize=False)
        theirs_text = source.get_text_features(input_ids=expected["input_ids"],
                                               attention_mask=expected["attention_mask"]).pooler_output
        out = model(input_ids=batch["input_ids"])
    assert (ours_image - theirs_image).abs().max().item() <= 1e-5
    assert (ours_text - theirs_text).abs().max().item() <= 1e-5
    assert out["logit_scale"].item() == pytest.approx(source.logit_scale.exp().item(), rel=1e-6)
    assert out["logit_bias"].item() == pytest.approx(-6.5)


def test_first_training_step_from_a_siglip2_source_encodes_as_the_source_and_its_loss_is_the_sources(siglip2_dir, shard):
    """The module the trainer hands DeepSpeed (mmcl.engine.setup: build_model, then TrainingTask), in train mode, on
    the loader's first batch: its features are the source's normalised embeddings and its loss is Siglip2Model's."""
    import torch.nn.functional as F
    from transformers import AutoProcessor

    from mmcl.engine.task import TrainingTask

    folder, source = siglip2_dir
    cfg = from_dict({"model": {"init_from": str(folder)}, "objectives": {"siglip": 1.0},
                     "data": {"train_shards": shard, "num_workers": 0, "shuffle_buffer": 0}})
    torch.manual_seed(cfg.seed)
    task = TrainingTask(build_model(cfg.model, image_size=cfg.data.image_size), cfg.objectives, None, cfg).train()
    batch = next(iter(build_train_loader(cfg.data, build_tokenizer(cfg.model.text), CONTEXT, batch_size=4, seed=0)))
    order = [int(key) for key in batch["keys"]]
    expected = AutoProcessor.from_pretrained(str(folder))(
        images=[images()[i] for i in order], text=[CAPTIONS[i] for i in order], padding="max_length", max_length=CONTEXT,
        truncation=True, patch_size=PATCH, max_num_patches=MAX_PATCHES, return_tensors="pt")
    with torch.no_grad():
        features = task.features(batch)
        step = task(batch)
        theirs = source(**expected, return_loss=True)
    assert (features["image_features"] - F.normalize(theirs.image_embeds, dim=-1)).abs().max().item() <= 1e-5
    assert (features["text_features"] - F.normalize(theirs.text_embeds, dim=-1)).abs().max().item() <= 1e-5
    assert step["loss"].item() == pytest.approx(theirs.loss.item(), rel=1e-6)


def test_siglip2_towers_load_by_name_or_path_from_a_siglip2_model_folder(siglip2_dir):
    folder, source = siglip2_dir
    cfg = from_dict({"model": {"image": {"name_or_path": str(folder)}, "text": {"name_or_path": str(folder), "context_length": CONTEXT},
                               "embed_dim": 32, "logit_bias_init": -10.0}, "objectives": {"siglip": 1.0}})
    model = build_model(cfg.model)
    assert (type(model.image_tower).__name__, type(model.text_tower).__name__) == ("Siglip2VisionModel", "Siglip2TextModel")
    assert (model.image_pooling, model.text_pooling) == ("pooler_output", "pooler_output")
    for ours, theirs in ((model.image_tower, source.vision_model), (model.text_tower, source.text_model)):
        expected = theirs.state_dict()
        assert all(torch.equal(tensor, expected[name]) for name, tensor in ours.state_dict().items())
