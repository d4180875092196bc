"""The start-up prediction of what plain transformers reproduces equals what the export then measures."""
from __future__ import annotations

import json

import pytest
from export_helpers import ENCODER, IMAGE, NO_DROPOUT, TEXT, build, run_config

from mmcl.export import export_model
from mmcl.export.plan import export_warnings, inexact_sides, plan_export

TEXT_MORE = {
    "roberta": dict(model_type="roberta", vocab_size=64, max_position_embeddings=20, **ENCODER, **NO_DROPOUT),
    "distilbert": dict(model_type="distilbert", vocab_size=64, max_position_embeddings=16, dim=32, n_layers=2, n_heads=2,
                       hidden_dim=64, dropout=0.0, attention_dropout=0.0),
    "albert": dict(model_type="albert", vocab_size=64, max_position_embeddings=16, embedding_size=16, **ENCODER,
                   **NO_DROPOUT),
    "siglip_text_model": dict(model_type="siglip_text_model", vocab_size=64, max_position_embeddings=16, **ENCODER),
    "siglip2_text_model": dict(model_type="siglip2_text_model", vocab_size=64, max_position_embeddings=16, **ENCODER),
}
IMAGE_MORE = {"siglip_vision_model": dict(model_type="siglip_vision_model", image_size=16, patch_size=4, **ENCODER),
              "siglip2_vision_model": dict(model_type="siglip2_vision_model", num_patches=16, patch_size=4, **ENCODER)}

# image, image pooling, image head, text, text pooling, text head, (image exact, text exact), architecture
CASES = [
    ("vit", "auto", "linear", "bert", "auto", "linear", (True, True), "VisionTextDualEncoderModel"),
    ("vit", "auto", "linear", "roberta", "auto", "linear", (True, True), "VisionTextDualEncoderModel"),
    ("vit", "mean", "linear", "bert", "cls", "linear", (False, False), "VisionTextDualEncoderModel"),
    ("vit", "cls", "mlp", "albert", "auto", "linear", (False, True), "VisionTextDualEncoderModel"),
    ("clip_vision_model", "cls", "linear", "clip_text_model", "mean", "linear", (False, False), "CLIPModel"),
    ("clip_vision_model", "auto", "linear", "clip_text_model", "auto", "linear", (True, True), "CLIPModel"),
    ("clip_vision_model", "auto", "linear", "distilbert", "auto", "linear", (True, False), "VisionTextDualEncoderModel"),
    ("dinov2", "cls", "linear", "clip_text_model", "eos", "linear", (True, True), "VisionTextDualEncoderModel"),
    ("convnext", "auto", "linear", "t5", "auto", "linear", (True, False), "VisionTextDualEncoderModel"),
    ("siglip_vision_model", "auto", "none", "siglip_text_model", "auto", "none", (True, True), "SiglipModel"),
    ("siglip_vision_model", "auto", "linear", "siglip_text_model", "auto", "linear", (True, False),
     "VisionTextDualEncoderModel"),
]


def config_for(tokenizer_dir, image, image_pooling, image_head, text, text_pooling, text_head):
    TEXT.update(TEXT_MORE)
    IMAGE.update(IMAGE_MORE)
    config = run_config(tokenizer_dir, image=image, text=text, image_pooling=image_pooling, text_pooling=text_pooling,
                        image_projection=image_head, text_projection=text_head,
                        embed_dim=32 if "none" in (image_head, text_head) else 24)
    if text == "siglip_text_model":
        config.model.logit_bias_init = -10.0
    return config


@pytest.mark.parametrize("image, image_pooling, image_head, text, text_pooling, text_head, exact, architecture", CASES)
def test_start_up_prediction_equals_the_measured_export(tmp_path, tokenizer_dir, image, image_pooling, image_head, text,
                                                        text_pooling, text_head, exact, architecture):
    config = config_for(tokenizer_dir, image, image_pooling, image_head, text, text_pooling, text_head)
    model, tokenizer = build(config)
    plans = plan_export(model)
    assert (plans["image"].exact, plans["text"].exact) == exact
    info = json.loads((export_model(model, config, tokenizer, tmp_path / "export") / "mmcl_export.json").read_text())
    assert (info["image"]["exact"], info["text"]["exact"]) == exact
    assert info["architecture"] == architecture


def test_each_inexact_side_is_one_warning_naming_the_reason_and_the_exact_alternative(tokenizer_dir):
    model, _ = build(config_for(tokenizer_dir, "vit", "mean", "linear", "bert", "cls", "linear"))
    lines = export_warnings(model, 12)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("the image side will not export exactly") and "exact instead: model.image.pooling: cls" in lines[0]
    assert "BertModel's pooler_output" in lines[1] and "exact instead: model.text.pooling: pooler_output" in lines[1]

    model, _ = build(config_for(tokenizer_dir, "clip_vision_model", "auto", "linear", "distilbert", "auto", "linear"))
    (line,) = export_warnings(model, 12)
    assert "distilbert has no pooled output in transformers" in line
    assert [side.kind for side in inexact_sides(plan_export(model))] == ["text"]

    model, _ = build(config_for(tokenizer_dir, "siglip_vision_model", "auto", "none", "siglip_text_model", "auto", "none"))
    assert export_warnings(model, 64) == []
    (line,) = export_warnings(model, 12)
    assert "pads SigLIP prompts to 64 tokens" in line and "set it to 64" in line


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_side(tower, kind: str, openclip: bool = False):
    """The same model type, pooling and head as a shipped config's tower, at test size (no download).
    `openclip`: the towers come from a converted OpenCLIP folder (model.init_from), a CLIPModel."""
    from dataclasses import replace

    if openclip:
        model_type = f"clip_{'vision' if kind == 'image' else 'text'}_model"
    elif tower.config is not None:
        model_type = tower.config["model_type"]
    else:  # a hub id: its family from the name
        name = tower.name_or_path.lower()
        model_type = next(t for key, t in (("siglip", f"siglip_{'vision' if kind == 'image' else 'text'}_model"),
                                           ("vit", "vit"), ("bert", "bert"), ("t5", "t5")) if key in name)
    tiny = {**IMAGE, **IMAGE_MORE} if kind == "image" else {**TEXT, **TEXT_MORE}
    options = dict(tiny[model_type])
    if kind == "text" and "max_position_embeddings" in options:
        options["max_position_embeddings"] = max(options["max_position_embeddings"], tower.context_length + 2)
    return replace(tower, name_or_path=None, config=options, gradient_checkpointing=False, lock=False,
                   **({"tokenizer": None} if kind == "text" else {}))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_export_exactly_or_say_why_not(path, tmp_path, monkeypatch):
    from dataclasses import replace

    from mmcl.config import load_config
    from mmcl.models import build_model

    (tmp_path / "data" / "demo" / "tokenizer").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)  # distill_demo's teacher: `make demo` writes it
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    openclip = getattr(config.model, "init_from", None) is not None
    sides = {"image": tiny_side(config.model.image, "image", openclip)}
    if config.model.text is not None:
        sides["text"] = tiny_side(config.model.text, "text", openclip)
    headless = any(side.projection == "none" for side in sides.values())
    model = build_model(replace(config.model, embed_dim=32 if headless else 24, init_from=None, **sides))
    plans = plan_export(model)
    exact = all(plan.exact for plan in plans.values())
    assert exact or "not exact" in path.read_text().lower(), [p for p in plans.values() if not p.exact]
