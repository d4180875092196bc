"""Export round trip from real runs: the deepspeed launcher, 2 CPU ranks, ZeRO-2 and ZeRO-3.

The runs are the session's ZeRO-2 and ZeRO-3 reference runs (tests/e2e/conftest.py: zero_runs,
shared with tests/e2e/test_training.py; 16 and 8 steps). Each run's last checkpoint is exported
(DeepSpeed's zero_to_fp32 consolidation) and loaded back with plain transformers, offline; the embeddings must equal
those of the mmcl model in the run's model/ folder. The tiny towers are ViT with `cls`
pooling (exact in transformers once the export sets ViT's pooler to the identity) and BERT
with `mean` pooling (not representable: transformers' text features are NaN on purpose and
`load_exported` reproduces mmcl's). Image-only (SimCLR) exports are tested in-process in tests/export.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import REPO, ZERO_STEPS, env
from PIL import Image

STAGES = {2: "configs/ds/zero2.json", 3: "configs/ds/zero3.json"}
TEXTS = ["a photo of the digit seven.", "handwritten 3", "the number zero written by hand"]


@pytest.fixture(scope="module")
def runs(zero_runs):
    """stage -> run directory of the session's finished ZeRO-2 / ZeRO-3 run (tests/e2e/conftest.py: zero_runs,
    the reference runs of tests/e2e/test_training.py), with zero-shot and retrieval evaluation at the end."""
    return {stage: zero_runs[stage][1] for stage in STAGES}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """stage -> export folder, written from the run's last DeepSpeed checkpoint (not from model/)."""
    from mmcl.export import export_run

    root = tmp_path_factory.mktemp("exports")
    return {stage: export_run(run_dir / "checkpoints" / f"step_{ZERO_STEPS[stage]:08d}", root / f"zero{stage}")
            for stage, run_dir in runs.items()}


def images() -> list[Image.Image]:
    """A 16-px digit-like image and two odd sizes whose centre crops round the same in torchvision and transformers."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((16, 16), (27, 41), (50, 33))]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_export_from_zero_checkpoint_gives_the_run_models_embeddings_in_transformers(runs, exports, stage):
    from transformers import AutoModel, AutoProcessor, VisionTextDualEncoderModel

    from mmcl.evaluation.loading import eval_transform
    from mmcl.model_dir import load_mmcl_model_dir
    from mmcl.export import load_exported
    from mmcl.models import tokenize

    model, config, tokenizer = load_mmcl_model_dir(runs[stage] / "model")
    export = exports[stage]
    info = json.loads((export / "mmcl_export.json").read_text())
    last = ZERO_STEPS[stage]
    assert info["source"] == {"path": f"checkpoints/step_{last:08d}", "kind": "checkpoint", "step": last}  # relative to the run
    assert info["image"]["exact"] and not info["text"]["exact"] and "averages" in info["text"]["reason"]

    hf = AutoModel.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export, backend="pil")
    assert isinstance(hf, VisionTextDualEncoderModel)
    inputs = processor(text=TEXTS, images=images(), return_tensors="pt", padding="max_length", truncation=True)
    transform = eval_transform(config.data.image_size, config.data.image_mean, config.data.image_std)
    reference_pixels = torch.stack([transform(image) for image in images()])
    torch.testing.assert_close(inputs["pixel_values"], reference_pixels, atol=1e-5, rtol=0)
    tokens = tokenize(tokenizer, TEXTS, config.model.text.context_length)
    assert torch.equal(inputs["input_ids"], tokens["input_ids"]) and torch.equal(inputs["attention_mask"], tokens["attention_mask"])

    with torch.no_grad():
        image_features = F.normalize(hf.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        torch.testing.assert_close(image_features, model.encode_image(reference_pixels), atol=1e-5, rtol=0)
        assert torch.isnan(hf.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output).all()
        expected_text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    exported = load_exported(export)
    torch.testing.assert_close(exported.encode_text(**exported.tokenize(TEXTS)), expected_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(exported.encode_image(exported.preprocess(images())), model.encode_image(reference_pixels), atol=1e-5, rtol=0)
    assert exported.logit_scale == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)


def test_default_torchvision_processor_is_within_one_grey_level_of_the_eval_transform(runs, exports):
    from transformers import AutoImageProcessor

    from mmcl.evaluation.loading import eval_transform

    info = json.loads((exports[2] / "mmcl_export.json").read_text())
    spec = info["image_transform"]
    transform = eval_transform(spec["image_size"], spec["mean"], spec["std"])
    processor = AutoImageProcessor.from_pretrained(exports[2])  # torchvision backend: bicubic on uint8 tensors
    grey_level = 1 / 255 / min(spec["std"])
    for image in images():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert (pixels - transform(image)).abs().max() <= grey_level + 1e-5
    assert info["processor_check"]["pil_max_abs_diff"] <= 1e-5
    assert info["processor_check"]["torchvision_max_abs_diff"] <= grey_level + 1e-5


def test_centre_crops_differ_by_one_pixel_when_the_offset_is_an_odd_half_as_the_card_says(exports):
    """27x40 resizes to 16x23: torchvision's CenterCrop starts at round(3.5) = 4, transformers' at 3."""
    import torchvision.transforms as T
    from transformers import AutoImageProcessor

    from mmcl.evaluation.loading import eval_transform

    spec = json.loads((exports[2] / "mmcl_export.json").read_text())["image_transform"]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (27, 40, 3), dtype=np.uint8))
    pixels = AutoImageProcessor.from_pretrained(exports[2], backend="pil")(images=image, return_tensors="pt")["pixel_values"][0]
    resized = T.Resize(16, interpolation=T.InterpolationMode.BICUBIC)(image)
    normalize = T.Compose([T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    torch.testing.assert_close(pixels, normalize(resized.crop((3, 0, 19, 16))), atol=1e-5, rtol=0)
    assert (pixels - eval_transform(16, spec["mean"], spec["std"])(image)).abs().max() > 0.1


def test_model_card_has_valid_metadata_with_the_runs_metrics_and_a_snippet_that_runs(runs, exports):
    from mmcl.export.card import front_matter_of

    export, run_dir = exports[2], runs[2]
    card = (export / "README.md").read_text()
    front = front_matter_of(card)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "zero-shot-image-classification"
    assert {"mmcl", "clip", "vit", "bert"} <= set(front["tags"]) and front["license"] == "other"
    assert front["datasets"] and front["datasets"][0].startswith("digits")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    prefixes = {"zero-shot-image-classification": "zeroshot/", "image-text-retrieval": "retrieval/"}
    reported = {prefixes[r["task"]["type"]] + m["type"]: m["value"]
                for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert reported == {k: v for k, v in metrics.items() if k.startswith(("zeroshot/", "retrieval/"))}
    assert len(reported) == 9
    seen = ZERO_STEPS[2] * 2 * 16  # steps x 2 ranks x micro-batch 16
    for needle in ("## Training", f"samples seen {seen}", "| world size (ranks) | 2 |", "| ZeRO stage | 2 |",
                   "![loss and zero-shot accuracy over training](training.png)", "NaN on purpose"):
        assert needle in card, needle
    assert (export / "training.png").read_bytes() == (run_dir / "training.png").read_bytes()
    assert json.loads((export / "metrics.json").read_text()) == metrics

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.chdir(export):
        exec(compile(code, "README.md", "exec"), {})  # as written: model_id "." is the export folder
    probabilities = [float(x) for x in re.findall(r"\d\.\d+(?:e[-+]\d+)?", printed.getvalue())]
    assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_cli_export_of_a_run_dir_uses_its_model_folder_and_equals_the_zero3_checkpoint_export(runs, exports, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "from_run_dir"
    result = subprocess.run([sys.executable, "-m", "mmcl.cli", "export", "--run", str(runs[3]), "--out", str(out)],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported {runs[3]} to {out}" in result.stdout
    assert json.loads((out / "mmcl_export.json").read_text())["source"]["kind"] == "model_dir"
    for name in ("model.safetensors", "mmcl_heads.safetensors"):
        gathered, consolidated = load_file(out / name), load_file(exports[3] / name)
        assert gathered.keys() == consolidated.keys()
        for key in gathered:
            assert torch.equal(gathered[key], consolidated[key]) or torch.isnan(gathered[key]).all(), key

