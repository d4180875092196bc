"""A transformers Siglip2Model directory as `distill.teacher` and as `mmcl curate score`'s model: it gets its own
NaFlex patches (its processor's patch size, patch count and normalisation) and tokens (its tokenizer, left-padded)
from the data pipeline, and its features are the model's own get_image_features / get_text_features on what its
processor makes of the same images and captions."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from siglip2_source import CONTEXT, MAX_PATCHES, PATCH, mixed_images, write_caption_shard, write_siglip2_source

from mmcl.config import from_dict
from mmcl.objectives.distill import DistillObjective
from mmcl.objectives.settings import DistillConfig
from mmcl.objectives.teacher import load_teacher

SIZES = [(40, 16), (16, 40), (32, 32), (90, 20)]
CAPTIONS = ["a photo of the digit 7", "the number 3", "a tall tree", "a wide car"]
VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}


def images() -> list[Image.Image]:
    return mixed_images(SIZES)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip2_teacher")
    write_siglip2_source(folder)
    return folder


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_caption_shard(root, images(), CAPTIONS)
    return root / "00000.tar"


def reference_features(folder, order):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(folder)).eval()
    inputs = AutoProcessor.from_pretrained(str(folder))(
        images=[images()[i] for i in order], text=[CAPTIONS[i] for i in order], padding="max_length", max_length=CONTEXT,
        truncation=True, patch_size=PATCH, max_num_patches=MAX_PATCHES, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                         pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    return inputs, F.normalize(image, dim=-1), F.normalize(text, dim=-1), model


def test_a_siglip2_teacher_gets_its_own_naflex_patches_and_tokens_and_gives_its_own_features(teacher_dir, shard):
    from mmcl.engine import training_data
    from mmcl.models import build_tokenizer

    teacher = load_teacher(DistillConfig(teacher=str(teacher_dir)))
    inputs = teacher.inputs()
    assert (inputs.naflex, inputs.mean, inputs.std, inputs.context_length) == ((PATCH, MAX_PATCHES), (0.4, 0.5, 0.6),
                                                                               (0.2, 0.3, 0.4), CONTEXT)
    cfg = from_dict({"model": {"image": {"config": VIT, "pooling": "cls"}, "embed_dim": 16,
                               "text": {"name_or_path": str(teacher_dir), "context_length": CONTEXT}},
                     "objectives": {"clip": 1.0, "distill": 1.0}, "distill": {"teacher": str(teacher_dir)},
                     "data": {"train_shards": str(shard), "image_size": 16, "num_workers": 0, "shuffle_buffer": 0},
                     "train": {"micro_batch_size": 4}})
    batch = next(iter(training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1, teacher=inputs)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # the student's square crops, beside the teacher's patches
    assert batch["teacher_pixel_values"].shape == (4, MAX_PATCHES, 3 * PATCH * PATCH)
    order = [int(key) for key in batch["keys"]]
    expected, image, text, model = reference_features(teacher_dir, order)
    assert torch.equal(batch["teacher_spatial_shapes"], expected["spatial_shapes"])
    assert torch.equal(batch["teacher_input_ids"], expected["input_ids"])
    outputs = DistillObjective(teacher).batch_outputs(batch)
    torch.testing.assert_close(outputs["teacher_image_features"], image, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["teacher_text_features"], text, atol=1e-5, rtol=0)
    assert outputs["teacher_logit_scale"].item() == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)


def test_curate_score_scores_with_a_siglip2_model_on_its_naflex_patches(teacher_dir, shard, tmp_path):
    import pyarrow.parquet as pq

    from mmcl.cli import main

    out = tmp_path / "scores"
    assert main(["curate", "score", "--model", str(teacher_dir), "--shards", str(shard), "--out", str(out),
                 "--batch-size", "4"]) == 0
    table = pq.read_table(out / "parts" / "00000-00000.parquet").to_pydict()
    order = [int(key) for key in table["key"]]
    _, image, text, _ = reference_features(teacher_dir, order)
    np.testing.assert_allclose(np.array(table["score"]), (image * text).sum(-1).numpy(), atol=1e-4)
    manifest = json.loads((out / "mmcl_curate.json").read_text())
    assert manifest["transform"]["max_num_patches"] == MAX_PATCHES


def test_curate_reinforce_stores_a_siglip2_teachers_embedding_of_each_box_as_its_processor_sees_it(teacher_dir, shard,
                                                                                                   tmp_path):
    """A NaFlex teacher in a reinforced store: each augmentation's embedding is the model's own on what its
    processor makes of that box (cropped at full size, flipped if drawn, resized keeping the box's aspect)."""
    import pyarrow.parquet as pq
    from transformers import AutoModel, AutoProcessor

    from mmcl.cli import main

    out, k = tmp_path / "store", 3
    assert main(["curate", "reinforce", "--teacher", str(teacher_dir), "--shards", str(shard), "--out", str(out),
                 "--augmentations", str(k), "--crop-scale", "0.3", "1.0", "--batch-size", "4", "--workers", "0"]) == 0
    manifest = json.loads((out / "mmcl_curate.json").read_text())
    assert manifest["teachers"][0]["naflex"] == {"patch_size": PATCH, "max_num_patches": MAX_PATCHES}
    assert manifest["teachers"][0]["image_size"] is None
    table = pq.read_table(out / "parts" / "00000-00000.parquet").to_pydict()
    model, processor = AutoModel.from_pretrained(str(teacher_dir)).eval(), AutoProcessor.from_pretrained(str(teacher_dir))
    crops, grids = [], set()
    for key, boxes, flips in zip(table["key"], table["boxes"], table["flips"]):
        image = images()[int(key)]
        width, height = image.size
        for j in range(k):
            top, left, h, w = boxes[4 * j:4 * j + 4]
            box = (round(left * width), round(top * height), round((left + w) * width), round((top + h) * height))
            crop = image.crop(box)
            crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flips[j] else crop)
    inputs = processor(images=crops, text=[CAPTIONS[int(key)] for key in table["key"]], padding="max_length",
                       max_length=CONTEXT, truncation=True, patch_size=PATCH, max_num_patches=MAX_PATCHES,
                       return_tensors="pt")
    grids = {tuple(shape.tolist()) for shape in inputs["spatial_shapes"]}
    assert len(grids) >= 2  # boxes of several aspect ratios: each its own patch grid, as the processor makes it
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                         pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    stored = torch.tensor(np.array(table["image_embedding_0"], dtype=np.float32)).reshape(-1, image.shape[-1])
    torch.testing.assert_close(stored, F.normalize(image, dim=-1), atol=2e-3, rtol=0)  # float16 storage
    torch.testing.assert_close(torch.tensor(np.array(table["text_embedding_0"], dtype=np.float32)),
                               F.normalize(text, dim=-1), atol=2e-3, rtol=0)
