"""model.init_from beyond CLIPModel: SiglipModel, VisionTextDualEncoderModel, mmcl exports and model dirs.

Each source is tiny, random and saved locally with save_pretrained; the model mmcl builds from it
(what the first training step computes with) must give the source's embeddings to 1e-5.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from export_helpers import ENCODER, IMAGE, TEXT, build, run_config, write_run

from mmcl.config import ConfigError, from_dict
from mmcl.models import build_tokenizer, tokenize
from mmcl.pretrained import build_model

TOLERANCE = 1e-5
CAPTIONS = ["a photo of the digit seven", "handwritten three", "number zero written by hand"]
PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def run(init_from, **model) -> "RunConfig":  # noqa: F821
    return from_dict({"model": {"init_from": str(init_from), **model}, "objectives": {"clip": 1.0}})


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def siglip_dir(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(vision_config=dict(image_size=16, patch_size=4, **ENCODER),
                          text_config=dict(vocab_size=64, max_position_embeddings=12, **ENCODER))
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.9)  # exp = 134: above mmcl's default cap of 100
        model.logit_bias.fill_(-7.25)
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(str(folder))
    SiglipImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder, model


@pytest.fixture(scope="module")
def vtde_dir(tokenizer_dir, tmp_path_factory):
    from transformers import (AutoTokenizer, BertConfig, CLIPImageProcessor, ViTConfig, VisionTextDualEncoderConfig,
                              VisionTextDualEncoderModel, VisionTextDualEncoderProcessor)

    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**{k: v for k, v in IMAGE["vit"].items() if k != "model_type"}),
        BertConfig(**{k: v for k, v in TEXT["bert"].items() if k != "model_type"}), projection_dim=20)
    model = VisionTextDualEncoderModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    folder = tmp_path_factory.mktemp("vtde")
    model.save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                   image_mean=[0.1, 0.2, 0.3], image_std=[0.6, 0.5, 0.4])
    VisionTextDualEncoderProcessor(image_processor=processor,
                                   tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir))).save_pretrained(str(folder))
    return folder, model


def test_init_from_a_siglip_model_gives_its_embeddings_logit_scale_and_bias(siglip_dir):
    folder, source = siglip_dir
    config = run(folder)
    model_cfg = config.model
    assert (model_cfg.embed_dim, model_cfg.text.context_length, model_cfg.image.projection, model_cfg.text.pooling) == (32, 12, "none", "pooler_output")
    assert (config.data.image_size, config.data.image_mean, config.data.image_std) == (16, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4])
    model = build_model(model_cfg).eval()
    tokens = tokenize(build_tokenizer(model_cfg.text), CAPTIONS, 12)
    with torch.no_grad():
        assert max_diff(model.encode_image(PIXELS, normalize=False), source.get_image_features(pixel_values=PIXELS).pooler_output) <= TOLERANCE
        assert max_diff(model.encode_text(**tokens, normalize=False), source.get_text_features(**tokens).pooler_output) <= TOLERANCE
        out = model(input_ids=tokens["input_ids"])
    assert out["logit_scale"].item() == pytest.approx(source.logit_scale.exp().item(), rel=1e-6)  # cap raised to fit
    assert out["logit_bias"].item() == pytest.approx(-7.25)


def test_lora_on_a_model_started_from_siglip_wraps_its_loaded_weights(siglip_dir):
    """Adapters go in after the source's weights: at step 0 (B = 0) the towers are the source's, and only
    the adapters (and heads) train."""
    folder, source = siglip_dir
    model_cfg = run(folder, image={"lora": {"rank": 2}}, text={"lora": {"rank": 2}}).model
    model = build_model(model_cfg).eval()
    tokens = tokenize(build_tokenizer(model_cfg.text), CAPTIONS, 12)
    with torch.no_grad():
        assert max_diff(model.encode_image(PIXELS, normalize=False), source.get_image_features(pixel_values=PIXELS).pooler_output) <= TOLERANCE
        assert max_diff(model.encode_text(**tokens, normalize=False), source.get_text_features(**tokens).pooler_output) <= TOLERANCE
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    assert trainable <= {"image_projection", "text_projection", "logit_scale", "logit_bias"}
    assert any("lora_A" in name for name, _ in model.image_tower.named_parameters())
    assert any("lora_A" in name for name, _ in model.text_tower.named_parameters())


def test_init_from_a_vision_text_dual_encoder_gives_its_embeddings_processor_and_tokenizer(vtde_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    folder, source = vtde_dir
    config = run(folder)
    assert (config.model.embed_dim, config.model.text.context_length, config.model.image.pooling) == (20, 16, "pooler_output")
    assert (config.data.image_size, config.data.image_mean, config.data.image_std) == (16, [0.1, 0.2, 0.3], [0.6, 0.5, 0.4])
    model = build_model(config.model).eval()
    tokenizer = build_tokenizer(config.model.text)
    tokens = tokenize(tokenizer, CAPTIONS, 16)
    assert torch.equal(tokens["input_ids"], tokenize(AutoTokenizer.from_pretrained(str(tokenizer_dir)), CAPTIONS, 16)["input_ids"])
    with torch.no_grad():
        assert max_diff(model.encode_image(PIXELS, normalize=False), source.get_image_features(pixel_values=PIXELS).pooler_output) <= TOLERANCE
        assert max_diff(model.encode_text(**tokens, normalize=False), source.get_text_features(**tokens).pooler_output) <= TOLERANCE
        assert model(input_ids=tokens["input_ids"])["logit_scale"].item() == pytest.approx(torch.tensor(3.0).exp().item(), rel=1e-6)


@pytest.fixture(scope="module")
def mmcl_run(tokenizer_dir, tmp_path_factory):
    """A finished run (model/ dir) with an mlp text head and a logit bias, and its export."""
    from mmcl.export.export import export_run

    config = run_config(tokenizer_dir, text_projection="mlp", logit_bias_init=-3.0, mlp_hidden_dim=40)
    model, tokenizer = build(config)
    with torch.no_grad():
        model.logit_bias.fill_(-4.5)
    root = tmp_path_factory.mktemp("mmcl_run")
    run_dir = write_run(root / "run", config, model, tokenizer)
    export = export_run(run_dir, root / "export")
    return run_dir / "model", export, model, tokenizer


@pytest.mark.parametrize("which", ["model_dir", "export"])
def test_init_from_an_mmcl_model_dir_or_export_gives_its_embeddings(mmcl_run, which):
    model_dir, export, source, tokenizer = mmcl_run
    config = run(model_dir if which == "model_dir" else export)
    assert (config.model.text.projection, config.model.mlp_hidden_dim, config.model.image.pooling) == ("mlp", 40, "cls")
    assert (config.data.image_size, config.data.image_mean) == (16, [0.5, 0.5, 0.5])
    model = build_model(config.model).eval()
    tokens = tokenize(build_tokenizer(config.model.text), CAPTIONS, 12)
    assert torch.equal(tokens["input_ids"], tokenize(tokenizer, CAPTIONS, 12)["input_ids"])
    with torch.no_grad():
        assert max_diff(model.encode_image(PIXELS, normalize=False), source.encode_image(PIXELS, normalize=False)) <= TOLERANCE
        assert max_diff(model.encode_text(**tokens, normalize=False), source.encode_text(**tokens, normalize=False)) <= TOLERANCE
        out = model(input_ids=tokens["input_ids"])
    assert (out["logit_scale"].item(), out["logit_bias"].item()) == (pytest.approx(torch.tensor(2.5).exp().item(), rel=1e-6), -4.5)


def test_init_from_what_cannot_be_carried_is_one_sentence(vtde_dir, mmcl_run, tmp_path):
    folder, _ = vtde_dir
    cases = []
    with pytest.raises(ConfigError) as error:
        run(folder, image={"projection": "mlp"})
    cases.append((error.value, "'model.image.projection' is mlp but"))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ConfigError) as error:
        run(tmp_path / "vit")
    cases.append((error.value, "is a 'vit' model, which has no image and text tower"))
    # an image-only mmcl model dir has no text tower to carry
    image_only = tmp_path / "ssl"
    image_only.mkdir()
    (image_only / "config.yaml").write_text(yaml.safe_dump({"model": {"image": {"config": dict(IMAGE["vit"])}, "text": None}}))
    (image_only / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        run(image_only)
    cases.append((error.value, "has no text tower; give 'model.text.name_or_path'"))
    for value, expected in cases:
        assert expected in str(value) and str(value).count("\n") == 0 and str(value).endswith(".")


@pytest.mark.e2e
def test_zero3_run_started_from_a_siglip_model_keeps_its_embeddings_scale_and_bias(siglip_dir, tmp_path):
    """One deepspeed launch (2 CPU ranks, ZeRO-3) from model.init_from = a SiglipModel, 2 steps at a negligible
    learning rate: the first step runs with SigLIP's logit scale, and the run's model/ gives SigLIP's embeddings."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    from data_tools.demo_dataset import build_demo
    from launch import deepspeed_command, run as launch, write_config

    from mmcl.evaluation.loading import load_mmcl_model_dir

    folder, source = siglip_dir
    data = tmp_path / "digits"
    build_demo(data, image_size=32, samples_per_shard=64)
    config = {"model": {"init_from": str(folder)}, "objectives": {"siglip": 1.0},
              "data": {"train_shards": str(data / "train" / "{00000..00003}.tar"), "shuffle_buffer": 16, "num_workers": 1},
              "optim": {"lr": 1e-12, "warmup_steps": 1}, "train": {"micro_batch_size": 8, "steps": 2, "log_every": 1},
              "output_dir": str(tmp_path / "run"), "seed": 0}
    result = launch(deepspeed_command(write_config(tmp_path / "run.yaml", config), "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next(r for r in records if "logit_scale" in r)
    assert first["step"] == 1 and first["logit_scale"] == pytest.approx(source.logit_scale.exp().item(), rel=1e-5)
    model, run_config_, tokenizer = load_mmcl_model_dir(tmp_path / "run" / "model")
    assert run_config_.data.image_size == 16 and model.logit_bias.item() == pytest.approx(-7.25, abs=1e-6)
    tokens = tokenize(tokenizer, CAPTIONS, 12)
    with torch.no_grad():
        assert max_diff(model.encode_image(PIXELS, normalize=False), source.get_image_features(pixel_values=PIXELS).pooler_output) <= TOLERANCE
        assert max_diff(model.encode_text(**tokens, normalize=False), source.get_text_features(**tokens).pooler_output) <= TOLERANCE
    # and it exports as a SiglipModel that plain transformers reproduces on both sides
    from mmcl.cli import main as mmcl_main

    assert mmcl_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "mmcl_export.json").read_text())
    assert (info["architecture"], info["image"]["exact"], info["text"]["exact"]) == ("SiglipModel", True, True)


def test_init_from_a_siglip_model_at_another_image_size_interpolates_its_positions(siglip_dir):
    folder, source = siglip_dir
    config = from_dict({"model": {"init_from": str(folder)}, "objectives": {"siglip": 1.0}, "data": {"image_size": 24}})
    model = build_model(config.model, image_size=config.data.image_size).eval()
    assert model.image_tower.config.image_size == 24
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 24, 24)).shape == (2, 32)
        # the learnt 4x4 grid is kept where it still applies: the rest of the tower is SigLIP's
        ours = dict(model.image_tower.named_parameters())
        for name, tensor in source.vision_model.named_parameters():
            if "position_embedding" not in name:
                assert torch.equal(ours[name], tensor), name
