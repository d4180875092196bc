"""A tiny SigLIP 2 NaFlex model on images of mixed aspect ratios through the real entry points: `python
train.py` (one process) trains with falling loss, resumes exactly from a checkpoint, `mmcl export` writes a
Siglip2Model, and plain transformers (AutoModel + AutoProcessor) gives mmcl's predictions on the shard's images."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch import BIN, REPO, losses, resume_copy, run, write_config
from PIL import Image
from siglip2_source import gemma_tokenizer

SIZES = [(40, 16), (16, 40), (32, 32), (64, 24)]
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def image(i: int) -> Image.Image:
    w, h = SIZES[i % 4]
    return Image.fromarray(np.random.default_rng(i % 8).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip2_naflex")
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(64):
            out = io.BytesIO()
            image(i).save(out, "PNG")
            for ext, data in (("png", out.getvalue()), ("txt", f"a photo of the number {i % 8}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "sizes.json").write_text(json.dumps({"00000.tar": 64}))
    (root / "eval").mkdir()
    with tarfile.open(root / "eval" / "00000.tar", "w") as tar:  # labelled images for the in-run zero-shot evaluation
        for i in range(16):
            out = io.BytesIO()
            image(i).save(out, "PNG")
            for ext, data in (("png", out.getvalue()), ("cls", str(i % 8).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "eval" / "classnames.txt").write_text("\n".join(str(n) for n in range(8)))
    (root / "eval" / "templates.json").write_text(json.dumps(["a photo of the number {}"]))
    gemma_tokenizer().save_pretrained(str(root / "tokenizer"))
    config = write_config(root / "run.yaml", {
        "model": {"image": {"config": {"model_type": "siglip2_vision_model", "patch_size": 8, "num_patches": 16, **ENCODER},
                            "projection": "none"},
                  "text": {"config": {"model_type": "siglip2_text_model", "vocab_size": 64, "max_position_embeddings": 12,
                                      "projection_size": 32, **ENCODER},
                           "tokenizer": str(root / "tokenizer"), "context_length": 12, "projection": "none"},
                  "embed_dim": 32, "logit_scale_init": 10.0, "logit_bias_init": -10.0},
        "objectives": {"siglip": 1.0},
        "data": {"train_shards": str(root / "00000.tar"), "naflex": {"patch_size": 8, "max_num_patches": 16},
                 "num_workers": 1, "shuffle_buffer": 8, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"micro_batch_size": 8, "steps": 6, "log_every": 1, "checkpoint_every": 3},
        "eval": {"zeroshot_shards": str(root / "eval" / "00000.tar"), "batch_size": 5},
        "seed": 0, "output_dir": str(root / "run")})
    for output_dir, extra in (("run", []), ("resumed", ["train.resume=latest"])):
        if output_dir == "resumed":
            resume_copy(root / "run", root / "resumed", "step_00000003")
        result = run([str(BIN / "python"), str(REPO / "train.py"), "--config", str(config), f"output_dir={root / output_dir}",
                      *extra])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mmcl.cli import main

    # `mmcl export` in this process, which the checks below load transformers into anyway
    assert main(["export", "--run", str(root / "run"), "--out", str(root / "export")]) == 0
    return root


def test_naflex_training_loss_falls_and_resume_continues_exactly(trained):
    logged = losses(trained / "run")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and logged[6] < 0.5 * logged[1]
    resumed = losses(trained / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[step] == pytest.approx(logged[step], rel=1e-6, abs=1e-6) for step in resumed), (resumed, logged)
    from safetensors.torch import load_file

    reference, continued = (load_file(trained / name / "model" / "model.safetensors") for name in ("run", "resumed"))
    assert reference.keys() == continued.keys()
    assert all(torch.allclose(continued[k], reference[k], rtol=0, atol=1e-6) for k in reference)


def test_plain_transformers_predictions_on_the_export_equal_mmcls(trained):
    from transformers import AutoModel, AutoProcessor

    from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch
    from mmcl.model_dir import load_mmcl_model_dir
    from mmcl.models import tokenize

    info = json.loads((trained / "export" / "mmcl_export.json").read_text())
    assert (info["architecture"], info["image"]["exact"], info["text"]["exact"]) == ("Siglip2Model", True, True)
    model, config, tokenizer = load_mmcl_model_dir(trained / "run" / "model")
    pictures, labels = [image(i) for i in range(8)], [f"a photo of the number {n}" for n in range(8)]
    transform = NaFlexPatchesU8(8, 16)
    patches = naflex_batch([transform(torch.from_numpy(np.array(p)).permute(2, 0, 1).contiguous()) for p in pictures],
                           [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        ours = model(**patches, **tokenize(tokenizer, labels, 12))
        hf = AutoModel.from_pretrained(str(trained / "export")).eval()
        theirs = hf(**AutoProcessor.from_pretrained(str(trained / "export"))(images=pictures, text=labels, return_tensors="pt"))
    expected = ours["logit_scale"] * ours["image_features"] @ ours["text_features"].T + ours["logit_bias"]
    torch.testing.assert_close(theirs.logits_per_image, expected, atol=1e-4, rtol=0)
    assert torch.equal(theirs.logits_per_image.argmax(-1), expected.argmax(-1))
    assert torch.sigmoid(expected).argmax(-1).tolist() == torch.sigmoid(theirs.logits_per_image).argmax(-1).tolist()
    torch.testing.assert_close(F.normalize(theirs.image_embeds, dim=-1), ours["image_features"], atol=1e-5, rtol=0)


def test_in_run_naflex_zeroshot_equals_mmcl_zeroshot_and_plain_transformers(trained, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from mmcl.evaluation.cli import zeroshot_main

    logged = json.loads((trained / "run" / "metrics.json").read_text())["zeroshot/acc1"]
    assert zeroshot_main(["--model", str(trained / "run" / "model"), "--data", str(trained / "eval" / "00000.tar"),
                          "--device", "cpu", "--workers", "0", "--output", str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["metrics"]["acc1"] == pytest.approx(logged, abs=1e-9)
    hf = AutoModel.from_pretrained(str(trained / "export")).eval()
    prompts = [f"a photo of the number {n}" for n in range(8)]
    inputs = AutoProcessor.from_pretrained(str(trained / "export"))(images=[image(i) for i in range(16)], text=prompts,
                                                                    return_tensors="pt")
    with torch.no_grad():
        predicted = hf(**inputs).logits_per_image.argmax(-1)
    assert logged == pytest.approx((predicted == torch.arange(16) % 8).float().mean().item(), abs=1e-9)
