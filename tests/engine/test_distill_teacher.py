"""The distillation teacher: loaded from a transformers CLIP directory, an mmcl model directory and an
OpenCLIP architecture with local weights; frozen, optionally bf16, fingerprinted (resume refuses other
weights); its feature cache (hits equal fresh features, a stale cache is refused); the data pipeline's
teacher inputs (one decode, the student's crop box at the teacher's size and normalisation, its own
tokens); and the config's distill checks."""
import json

import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from mmcl.config import ConfigError, RunConfig, from_dict
from mmcl.models import build_model
from mmcl.objectives.distill import DistillObjective
from mmcl.objectives.settings import DistillConfig
from mmcl.objectives.teacher import Teacher, TeacherInputs, TeacherLoadError, load_teacher
from mmcl.objectives.teacher_cache import StaleCacheError, TeacherFeatureCache

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}
BERT = {"model_type": "bert", "vocab_size": 300, "max_position_embeddings": 16, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_OPENCLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=200)
    return out


def run_config(tokenizer_dir, **distill) -> RunConfig:
    raw = {"model": {"image": {"config": VIT, "pooling": "cls"},
                     "text": {"config": BERT, "tokenizer": str(tokenizer_dir / "tokenizer"), "context_length": 16},
                     "embed_dim": 16},
           "objectives": {"clip": 1.0, "distill": 1.0}, "distill": distill,
           "data": {"train_shards": str(tokenizer_dir / "train" / "{00000..00003}.tar"), "image_size": 16,
                    "num_workers": 0, "shuffle_buffer": 0}}
    return from_dict(raw)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer_dir):
    """A tiny transformers CLIPModel at 24 px with an image processor and a tokenizer."""
    out = tmp_path_factory.mktemp("clip_teacher")
    config = CLIPConfig(text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "max_position_embeddings": 20},
                        vision_config={"image_size": 24, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=12)
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir / "tokenizer").save_pretrained(out)
    return out


def test_a_transformers_clip_directory_teaches_with_its_own_size_normalisation_tokens_and_scale(clip_dir):
    teacher = load_teacher(DistillConfig(teacher=str(clip_dir)))
    inputs = teacher.inputs()
    assert (inputs.image_size, inputs.mean, inputs.std, inputs.context_length) == (24, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 20)
    assert teacher.logit_scale == pytest.approx(torch.tensor(2.6592).exp().item(), rel=1e-6)  # CLIP's initial scale
    pixels = torch.randn(3, 3, 24, 24)
    reference = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels)
    expected = expected if torch.is_tensor(expected) else expected.pooler_output
    assert torch.allclose(teacher.encode_image(pixels), torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
    tokens = inputs.tokenizer(["three", "a digit"], padding="max_length", max_length=20, return_tensors="pt")
    assert teacher.encode_text(tokens["input_ids"], tokens["attention_mask"]).shape == (2, 12)
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training


def test_bf16_teacher_gives_nearly_the_fp32_features_and_the_same_fingerprint(clip_dir):
    fp32 = load_teacher(DistillConfig(teacher=str(clip_dir)))
    bf16 = load_teacher(DistillConfig(teacher=str(clip_dir), precision="bf16"))
    assert next(bf16.module.parameters()).dtype == torch.bfloat16
    pixels = torch.randn(4, 3, 24, 24)
    assert bf16.encode_image(pixels).dtype == torch.float32
    assert (bf16.encode_image(pixels) - fp32.encode_image(pixels)).abs().max() < 0.05
    assert bf16.sha256 == fp32.sha256  # the fingerprint is of the weights as loaded


def test_an_mmcl_model_directory_teaches_with_the_model_s_own_features(tmp_path, tokenizer_dir):
    from mmcl.model_dir import save_model_dir
    from mmcl.models import build_tokenizer

    cfg = run_config(tokenizer_dir, teacher=str(tmp_path))
    torch.manual_seed(5)
    model = build_model(cfg.model).eval()
    save_model_dir(model, cfg, build_tokenizer(cfg.model.text), tmp_path / "teacher")
    teacher = load_teacher(DistillConfig(teacher=str(tmp_path / "teacher")))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
    assert teacher.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert teacher.inputs().context_length == 16


def test_an_openclip_architecture_with_local_weights_teaches_and_other_weights_are_refused_on_resume(tmp_path):
    import open_clip

    config = tmp_path / "tiny-oc-unit.json"
    config.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-oc-unit")
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    torch.save(model.state_dict(), tmp_path / "b.pt")
    spec = {"teacher": "openclip:tiny-oc-unit", "openclip_config": str(config)}
    a = load_teacher(DistillConfig(weights=str(tmp_path / "a.pt"), **spec))
    b = load_teacher(DistillConfig(weights=str(tmp_path / "b.pt"), **spec))
    assert a.inputs().image_size == 24 and a.inputs().context_length == 12
    assert b.logit_scale == pytest.approx(torch.tensor(2.0).exp().item())
    ids = open_clip.get_tokenizer("tiny-oc-unit")(["a photo of a seven"])
    with torch.no_grad():
        expected = model.encode_text(ids, normalize=True)
    assert torch.allclose(b.encode_text(ids, torch.ones_like(ids)), expected, atol=1e-6)
    assert a.sha256 != b.sha256
    saved = DistillObjective(a).extra_state()
    DistillObjective(a).load_extra_state(saved)  # the same weights: accepted
    with pytest.raises(TeacherLoadError, match="is not the teacher this run was trained with"):
        DistillObjective(b).load_extra_state(saved)
    with pytest.raises(TeacherLoadError, match="open_clip has no architecture 'no-such-arch'"):
        load_teacher(DistillConfig(teacher="openclip:no-such-arch", weights=str(tmp_path / "a.pt")))


def mmcl_teacher(seed: int = 1) -> Teacher:
    cfg = from_dict({"model": {"image": {"config": VIT}, "text": {"config": BERT, "tokenizer": "unused", "context_length": 8},
                               "embed_dim": 8}})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    return Teacher(model, model.encode_image, model.encode_text, 10.0, TeacherInputs(16, (0.5,) * 3, (0.5,) * 3, None, 8), "t")


def teacher_batch(keys: list[str], captions: str = "same") -> dict:
    """Each sample's image and tokens are a function of its key (and of `captions`)."""
    rows = [torch.Generator().manual_seed(ord(key) * 7 + (captions != "same")) for key in keys]
    return {"keys": keys,
            "teacher_pixel_values": torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(ord(k)))
                                                 for k in keys]),
            "teacher_input_ids": torch.stack([torch.randint(1, 50, (8,), generator=g) for g in rows]),
            "teacher_attention_mask": torch.ones(len(keys), 8, dtype=torch.long)}


def test_cached_teacher_features_equal_fresh_ones_across_runs_and_a_stale_cache_is_refused(tmp_path):
    teacher = mmcl_teacher()
    fingerprint = {"teacher_sha256": teacher.sha256, "transform": "ResizeCenterCropU8(size=16)"}
    fresh = DistillObjective(teacher).batch_outputs(teacher_batch(["a", "b", "c"]))
    first = DistillObjective(teacher, TeacherFeatureCache(tmp_path, fingerprint))
    partly = first.batch_outputs(teacher_batch(["a", "b"]))  # encoded and cached
    both = first.batch_outputs(teacher_batch(["a", "b", "c"]))  # a, b from the cache; c encoded
    assert (first.cache.hits, first.cache.misses) == (4, 6)
    for key in ("teacher_image_features", "teacher_text_features"):
        assert torch.allclose(both[key], fresh[key], atol=1e-6) and torch.allclose(partly[key], fresh[key][:2], atol=1e-6)
    first.extra_state()  # a checkpoint writes the new entries
    second = DistillObjective(teacher, TeacherFeatureCache(tmp_path, fingerprint, rank=1))  # a later run
    again = second.batch_outputs(teacher_batch(["c", "a", "b"], captions="other"))
    assert (second.cache.hits, second.cache.misses) == (3, 3)  # images found by key; other captions encoded
    assert torch.equal(again["teacher_image_features"], both["teacher_image_features"][[2, 0, 1]])
    assert not torch.allclose(again["teacher_text_features"], both["teacher_text_features"][[2, 0, 1]])
    with pytest.raises(StaleCacheError, match="holds features of another teacher or transform .*teacher_sha256"):
        TeacherFeatureCache(tmp_path, {**fingerprint, "teacher_sha256": mmcl_teacher(seed=2).sha256})


def test_the_loader_gives_the_teacher_the_student_s_crop_at_its_own_size_normalisation_and_tokens(tokenizer_dir, clip_dir):
    from mmcl.engine import training_data
    from mmcl.objectives.distill import teacher_transform
    from mmcl.models import build_tokenizer

    cfg = run_config(tokenizer_dir, teacher=str(clip_dir))
    tokenizer = build_tokenizer(cfg.model.text)
    same = TeacherInputs(16, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), tokenizer, 16)
    batch = next(iter(training_data.build(cfg, tokenizer, 0, 1, teacher=same)))
    # the same size and normalisation as the student: the replayed crop box gives the identical tensor
    assert torch.equal(batch["teacher_pixel_values"], batch["pixel_values"])
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    own = load_teacher(cfg.distill).inputs()
    batch = next(iter(training_data.build(cfg, tokenizer, 0, 1, teacher=own)))
    assert batch["teacher_pixel_values"].shape == (cfg.train.micro_batch_size, 3, 24, 24)
    assert batch["teacher_input_ids"].shape == (cfg.train.micro_batch_size, 20)
    assert repr(teacher_transform(cfg, own)).startswith("RandomResizedCropU8(size=24")
    cached = run_config(tokenizer_dir, teacher=str(clip_dir), cache_dir="somewhere")
    assert repr(teacher_transform(cached, own)) == "ResizeCenterCropU8(size=24)"
    plain = from_dict({"model": {"image": {"config": VIT}, "embed_dim": 16,
                                 "text": {"config": BERT, "tokenizer": str(tokenizer_dir / "tokenizer"), "context_length": 16}},
                       "data": {"train_shards": cfg.data.train_shards, "image_size": 16, "num_workers": 0}})
    assert not any(key.startswith("teacher_") for key in next(iter(training_data.build(plain, tokenizer, 0, 1))))


@pytest.mark.parametrize("distill, objectives, message", [
    ({}, {"clip": 1.0, "distill": 1.0}, "objective 'distill' needs 'distill.teacher'"),
    ({"teacher": "openclip:ViT-B-32"}, {"clip": 1.0, "distill": 1.0}, "needs 'distill.weights'"),
    ({"teacher": "/no/such/dir"}, {"clip": 1.0, "distill": 1.0}, "which is not a directory"),
    ({"teacher": "hf-hub:org/name"}, {"clip": 1.0}, "'objectives' has no 'distill'"),
])
def test_config_names_the_distill_mistake(distill, objectives, message):
    raw = {"model": {"image": {"config": VIT}, "text": {"config": BERT, "tokenizer": "unused"}},
           "objectives": objectives, "distill": distill}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_an_mmcl_export_teaches_with_the_model_s_own_features_size_and_tokens(tmp_path, tokenizer_dir):
    """An export (here inexact on the text side: BERT mean pooling) teaches through mmcl's loader, exactly."""
    from mmcl.export import export_model
    from mmcl.models import build_tokenizer, tokenize

    cfg = run_config(tokenizer_dir, teacher=str(tmp_path))
    cfg.model.text.pooling = "mean"
    torch.manual_seed(7)
    model = build_model(cfg.model).eval()
    tokenizer = build_tokenizer(cfg.model.text)
    export_model(model, cfg, tokenizer, tmp_path / "export")
    teacher = load_teacher(DistillConfig(teacher=str(tmp_path / "export")))
    pixels = torch.randn(2, 3, 16, 16)
    tokens = tokenize(tokenizer, ["a photo of the digit seven.", "handwritten 3"], 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher.encode_image(pixels), model.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(teacher.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                                   model.encode_text(tokens["input_ids"], tokens["attention_mask"]), atol=1e-5, rtol=0)
    assert teacher.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert teacher.inputs().context_length == 16 and teacher.inputs().image_size == 16
