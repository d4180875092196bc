"""A transformers SiglipModel directory and a VisionTextDualEncoderModel directory as `distill.teacher`
(tiny random-init models saved with an image processor and a tokenizer beside them): the teacher's
features are the model's own `get_image_features` / `get_text_features` (unit rows) on the pixels and
tokens the data pipeline gives it; its image size, normalisation and tokenization are the directory's
processor and tokenizer; its logit scale is the model's, and the distill loss's targets are the
softmax of the model's own logits (for SigLIP the logit bias is dropped: a softmax over the batch is
shift-invariant, so the targets equal those of the model's biased logits)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoTokenizer, BertConfig, SiglipConfig, SiglipImageProcessor, SiglipModel,
                          ViTConfig, ViTImageProcessor, VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

from mmcl.config import from_dict
from mmcl.data.tokenize import CaptionTokenizer
from mmcl.losses.distill import soft_cross_entropy
from mmcl.objectives.distill import DistillObjective
from mmcl.objectives.settings import DistillConfig
from mmcl.objectives.teacher import load_teacher

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}
BERT = {"model_type": "bert", "vocab_size": 300, "max_position_embeddings": 16, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
CONTEXT = 20  # the teachers' text positions (the student's is 16)
MEAN, STD = (0.45, 0.4, 0.35), (0.25, 0.2, 0.3)  # the teachers' processors' normalisation (neither CLIP's nor 0.5)
EXTRA_TOKEN = "sevenish"  # added to the teachers' tokenizer only: its tokenization differs from the student's


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=200)
    return out


def save_beside(model, processor, digits, out):
    """The model, its image processor and a tokenizer (the digits' one plus EXTRA_TOKEN) in `out`."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(digits / "tokenizer")
    tokenizer.add_tokens([EXTRA_TOKEN])
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, digits):
    config = SiglipConfig(text_config={"vocab_size": 301, "max_position_embeddings": CONTEXT, **TOWER},
                          vision_config={"image_size": 24, "patch_size": 8, **TOWER})
    torch.manual_seed(11)
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's released values (t' = ln 10, b = -10), not the init's (0, 0)
        model.logit_scale.fill_(torch.tensor(10.0).log().item())
        model.logit_bias.fill_(-10.0)
    processor = SiglipImageProcessor(size={"height": 24, "width": 24}, image_mean=list(MEAN), image_std=list(STD))
    return save_beside(model, processor, digits, tmp_path_factory.mktemp("siglip_teacher"))


@pytest.fixture(scope="module")
def dual_encoder_dir(tmp_path_factory, digits):
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=24, patch_size=8, **TOWER),
        BertConfig(vocab_size=301, max_position_embeddings=CONTEXT, **TOWER), projection_dim=12, logit_scale_init_value=3.0)
    torch.manual_seed(12)
    model = VisionTextDualEncoderModel(config)
    processor = ViTImageProcessor(size={"height": 24, "width": 24}, image_mean=list(MEAN), image_std=list(STD))
    return save_beside(model, processor, digits, tmp_path_factory.mktemp("dual_encoder_teacher"))


KINDS = {"siglip": (SiglipModel, 10.0), "vision-text-dual-encoder": (VisionTextDualEncoderModel, torch.tensor(3.0).exp().item())}


@pytest.fixture(params=sorted(KINDS))
def teacher_dir(request, siglip_dir, dual_encoder_dir):
    return request.param, {"siglip": siglip_dir, "vision-text-dual-encoder": dual_encoder_dir}[request.param]


def features(output):
    return F.normalize(output if torch.is_tensor(output) else output.pooler_output, dim=-1)


def pipeline_batch(digits, teacher):
    """One real training batch (decoded digits shards) with the teacher's pixels and tokens."""
    from mmcl.engine import training_data
    from mmcl.models import build_tokenizer

    cfg = from_dict({"model": {"image": {"config": VIT, "pooling": "cls"}, "embed_dim": 16,
                               "text": {"config": BERT, "tokenizer": str(digits / "tokenizer"), "context_length": 16}},
                     "objectives": {"clip": 1.0, "distill": 1.0}, "distill": {"teacher": teacher.name},
                     "data": {"train_shards": str(digits / "train" / "{00000..00003}.tar"), "image_size": 16,
                              "num_workers": 0, "shuffle_buffer": 0},
                     "train": {"micro_batch_size": 6}})
    return next(iter(training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1, teacher=teacher.inputs())))


def test_teacher_inputs_are_the_directory_s_processor_size_normalisation_and_tokenizer(teacher_dir, digits):
    kind, path = teacher_dir
    teacher = load_teacher(DistillConfig(teacher=str(path)))
    inputs = teacher.inputs()
    assert (inputs.image_size, inputs.mean, inputs.std, inputs.context_length) == (24, MEAN, STD, CONTEXT)
    captions = [f"a {EXTRA_TOKEN} digit", "handwritten 3"]
    own = AutoTokenizer.from_pretrained(path)(captions, padding="max_length", max_length=CONTEXT, return_tensors="pt")
    ids, mask = CaptionTokenizer(inputs.tokenizer, inputs.context_length)(captions)
    assert torch.equal(ids, own["input_ids"]) and torch.equal(mask, own["attention_mask"])
    student = AutoTokenizer.from_pretrained(digits / "tokenizer")(captions[:1], padding="max_length", max_length=CONTEXT)
    assert ids[0].tolist() != student["input_ids"][0]  # the directory's tokenizer, not the student's


def test_teacher_features_are_the_model_s_own_on_the_pipeline_s_pixels_and_tokens(teacher_dir, digits):
    kind, path = teacher_dir
    model_class, _ = KINDS[kind]
    teacher = load_teacher(DistillConfig(teacher=str(path)))
    batch = pipeline_batch(digits, teacher)
    pixels, ids, mask = batch["teacher_pixel_values"], batch["teacher_input_ids"], batch["teacher_attention_mask"]
    assert pixels.shape == (6, 3, 24, 24) and ids.shape == (6, CONTEXT)
    reference = model_class.from_pretrained(path).eval()
    with torch.no_grad():
        image = features(reference.get_image_features(pixel_values=pixels))
        # SigLIP's text tower is trained on max_length-padded tokens without a mask (it pools the last position)
        text = features(reference.get_text_features(input_ids=ids) if kind == "siglip"
                        else reference.get_text_features(input_ids=ids, attention_mask=mask))
    torch.testing.assert_close(teacher.encode_image(pixels), image, atol=1e-6, rtol=0)
    torch.testing.assert_close(teacher.encode_text(ids, mask), text, atol=1e-6, rtol=0)
    assert not torch.allclose(image[0], image[1], atol=1e-3)  # different digits, different features


def test_distill_targets_are_the_softmax_of_the_model_s_own_logits_at_its_scale(teacher_dir, digits):
    """The loss equals soft cross-entropy against the model's own forward logits (SigLIP: bias included,
    which a softmax over the batch ignores); the scale it uses is the model's (10 / e^3, not CLIP's 1/0.07)."""
    kind, path = teacher_dir
    model_class, scale = KINDS[kind]
    teacher = load_teacher(DistillConfig(teacher=str(path)))
    assert teacher.logit_scale == pytest.approx(scale, rel=1e-6)
    batch = pipeline_batch(digits, teacher)
    objective = DistillObjective(teacher)
    outputs = objective.batch_outputs(batch)
    assert outputs["teacher_logit_scale"].item() == pytest.approx(scale, rel=1e-6)
    torch.manual_seed(0)
    student = {"image_features": F.normalize(torch.randn(6, 16), dim=-1), "text_features": F.normalize(torch.randn(6, 16), dim=-1),
               "logit_scale": torch.tensor(14.0)}
    loss = objective({**student, **outputs})["loss"]

    reference = model_class.from_pretrained(path).eval()
    forward = {"input_ids": batch["teacher_input_ids"], "pixel_values": batch["teacher_pixel_values"]}
    if kind != "siglip":
        forward["attention_mask"] = batch["teacher_attention_mask"]
    with torch.no_grad():
        logits = reference(**forward)
    if kind == "siglip":  # the model's logits carry its bias of -10; the targets do not depend on it
        unbiased = scale * features(reference.get_image_features(pixel_values=forward["pixel_values"])) \
            @ features(reference.get_text_features(input_ids=forward["input_ids"])).T
        torch.testing.assert_close(logits.logits_per_image, unbiased - 10.0, atol=1e-4, rtol=0)
    logits_i2t = student["logit_scale"] * student["image_features"] @ student["text_features"].T
    expected = (soft_cross_entropy(logits_i2t, logits.logits_per_image)
                + soft_cross_entropy(logits_i2t.T, logits.logits_per_text)) / (2 * 6)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    # a teacher scale of 1 (SigLIP's init) or CLIP's 1/0.07 would give other targets, hence another loss
    for other in (1.0, 1 / 0.07):
        wrong = objective({**student, **outputs, "teacher_logit_scale": torch.tensor(other)})["loss"]
        assert abs(wrong.item() - expected.item()) > 1e-3
