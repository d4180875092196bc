"""Export of in-process models: what plain transformers reproduces, what the mmcl loader reproduces.

The end-to-end round trip from ZeRO-2/3 checkpoints is in tests/e2e/test_export.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
import torch.nn.functional as F
from export_helpers import build, run_config, write_run
from PIL import Image


from mmcl.export import ExportError, export_model, export_run, load_exported
from mmcl.export.card import front_matter_of
from mmcl.models import tokenize

TEXTS = ["a photo of the digit seven", "handwritten 3", " ".join(["number"] * 30)]  # the last one is truncated


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run_snippet(folder, block: int = 0) -> str:
    """Execute the card's `block`-th Python snippet as written, inside the export folder (model_id "."); returns what it printed."""
    card = (folder / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", card, re.S)[block]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.chdir(folder):
        exec(compile(code, "README.md", "exec"), {})
    return printed.getvalue()


def test_clip_towers_export_as_clip_model_that_plain_transformers_reproduces(tmp_path, tokenizer_dir):
    from transformers import AutoModel, AutoProcessor, CLIPModel

    config = run_config(tokenizer_dir, image="clip_vision_model", text="clip_text_model",
                        image_pooling="pooler_output", text_pooling="eos")
    model, tokenizer = build(config)
    out = export_run(write_run(tmp_path / "run", config, model, tokenizer) / "model", tmp_path / "export")

    info = json.loads((out / "mmcl_export.json").read_text())
    assert info["architecture"] == "CLIPModel" and info["image"]["exact"] and info["text"]["exact"]
    assert any("eos_token_id" in note for note in info["text"]["adjustments"])
    hf = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert isinstance(hf, CLIPModel)
    inputs = processor(text=TEXTS, return_tensors="pt", padding="max_length", truncation=True)
    reference = tokenize(tokenizer, TEXTS, 12)
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    assert torch.equal(inputs["attention_mask"], reference["attention_mask"])
    with torch.no_grad():
        image = F.normalize(hf.get_image_features(pixel_values=pixels()).pooler_output, dim=-1)
        text = F.normalize(hf.get_text_features(**inputs).pooler_output, dim=-1)
        torch.testing.assert_close(image, model.encode_image(pixels()), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, model.encode_text(reference["input_ids"], reference["attention_mask"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf.logit_scale.exp(), torch.tensor(2.5).exp())
    printed = run_snippet(out)
    assert "AutoModel.from_pretrained" in (out / "README.md").read_text() and "tensor(" in printed


def test_bert_cls_pooling_and_mlp_head_are_not_exact_so_transformers_gives_nan_and_the_loader_is_exact(tmp_path, tokenizer_dir):
    from transformers import AutoModel

    config = run_config(tokenizer_dir, text_pooling="cls", image_projection="mlp")
    model, tokenizer = build(config)
    out = export_run(write_run(tmp_path / "run", config, model, tokenizer), tmp_path / "export")

    info = json.loads((out / "mmcl_export.json").read_text())
    assert info["architecture"] == "VisionTextDualEncoderModel"
    assert not info["image"]["exact"] and "mlp" in info["image"]["reason"]
    assert not info["text"]["exact"] and "tanh" in info["text"]["reason"]
    card = (out / "README.md").read_text()
    assert "NaN on purpose" in card and "load_exported" in card
    hf = AutoModel.from_pretrained(out).eval()
    tokens = tokenize(tokenizer, TEXTS, 12)
    with torch.no_grad():
        assert torch.isnan(hf.get_image_features(pixel_values=pixels()).pooler_output).all()
        assert torch.isnan(hf.get_text_features(**tokens).pooler_output).all()
    exported = load_exported(out)
    torch.testing.assert_close(exported.encode_image(pixels()), model.encode_image(pixels()), atol=1e-5, rtol=0)
    torch.testing.assert_close(exported.encode_text(**exported.tokenize(TEXTS)),
                               model.encode_text(tokens["input_ids"], tokens["attention_mask"]), atol=1e-5, rtol=0)
    assert exported.logit_scale == pytest.approx(torch.tensor(2.5).exp().item())
    assert "tensor(" in run_snippet(out)


def test_image_only_simclr_run_exports_the_tower_with_exact_pooler_output_and_the_head_beside_it(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, ViTModel

    config = run_config(None, text=None, image_pooling="cls", image_projection="none", embed_dim=32)  # as mmcl requires
    model, _ = build(config)
    run = write_run(tmp_path / "run", config, model, None, metrics={"knn/acc1": 0.5, "knn/acc5": 0.9, "steps": 2})
    out = export_run(run, tmp_path / "export")

    info = json.loads((out / "mmcl_export.json").read_text())
    assert info["architecture"] == "image_tower" and info["image"]["features"] == "pooled" and info["image"]["exact"]
    hf = AutoModel.from_pretrained(out).eval()
    assert isinstance(hf, ViTModel)
    assert not (out / "tokenizer_config.json").exists()
    image = Image.fromarray(torch.randint(0, 256, (23, 31, 3), dtype=torch.uint8).numpy())
    processed = AutoImageProcessor.from_pretrained(out, backend="pil")(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model.pooled_image_features(processed)
        torch.testing.assert_close(hf(pixel_values=processed).pooler_output, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_exported(out).encode_image(processed), model.encode_image(processed), atol=1e-5, rtol=0)
    front = front_matter_of((out / "README.md").read_text())
    assert front["pipeline_tag"] == "image-feature-extraction"
    assert {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]} == {"acc1": 0.5, "acc5": 0.9}
    assert "torch.Size([1, 32])" in run_snippet(out)


@pytest.mark.parametrize("image, image_pooling, text, text_pooling, exact", [
    ("convnext", "auto", "t5", "mean", (True, False)),  # ConvNeXt gets hidden_size; T5EncoderModel is not what VTDE builds
    ("clip_vision_model", "cls", "bert", "pooler_output", (False, True)),  # CLIP's cls is before its post-layernorm
    ("dinov2", "cls", "clip_text_model", "mean", (True, False)),  # DINOv2's pooler_output is its class token
])
def test_any_tower_pair_exports_and_the_loader_reproduces_mmcl(tmp_path, tokenizer_dir, image, image_pooling, text,
                                                              text_pooling, exact):
    from transformers import AutoConfig

    config = run_config(tokenizer_dir, image=image, text=text, image_pooling=image_pooling, text_pooling=text_pooling)
    model, tokenizer = build(config)
    out = export_model(model, config, tokenizer, tmp_path / "export")  # raises unless the export reproduces the model

    info = json.loads((out / "mmcl_export.json").read_text())
    assert (info["image"]["exact"], info["text"]["exact"]) == exact
    exported = load_exported(out)
    assert type(exported.text_tower) is type(model.text_tower)
    tokens = exported.tokenize(TEXTS)
    torch.testing.assert_close(exported.encode_text(**tokens), model.encode_text(**tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(exported.encode_image(pixels()), model.encode_image(pixels()), atol=1e-5, rtol=0)
    if text == "clip_text_model":  # special ids follow the tokenizer (CLIP's defaults lie outside this vocabulary)
        assert AutoConfig.from_pretrained(out).text_config.eos_token_id == tokenizer.eos_token_id


def test_export_refuses_a_non_empty_out_dir_and_paths_without_weights(tmp_path, tokenizer_dir):
    config = run_config(tokenizer_dir)
    model, tokenizer = build(config)
    run = write_run(tmp_path / "run", config, model, tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists and is not empty.*--overwrite"):
        export_run(run, tmp_path / "taken")
    assert (tmp_path / "taken" / "file.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ExportError, match="neither a finished model/ folder nor a checkpoint"):
        export_run(tmp_path / "empty_run", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # no work folder left
