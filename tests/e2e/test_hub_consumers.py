"""The Hub user's view: models trained with the default poolings work in plain transformers.

For each exact pair (CLIP/CLIP -> CLIPModel, ViT + BERT -> VisionTextDualEncoderModel,
SigLIP/SigLIP -> SiglipModel) a tiny model trains for a few steps (ZeRO-2) on the digits: ViT +
BERT with the real deepspeed launcher on 2 CPU ranks (its card shows the world size), CLIP and
SigLIP on one rank as `python train.py` (what they check is the export, not the launcher, and
one rank needs none). Each is exported with `mmcl export`, and a fresh process that imports
only transformers (tests/e2e/hf_consumer.py) loads it with AutoModel / AutoProcessor and the
zero-shot pipeline and runs the card's snippets as written. Its embeddings must equal mmcl's
to 1e-5 and the pipeline must rank first the class mmcl's zero-shot classifier picks, on every
test image. Poolings are left to `auto` throughout. One
consumer process reads the three exports (`consumer_views`).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from launch import ENCODER, REPO, deepspeed_command, env, python_command, run, tiny_run_config, write_config

TEMPLATE = "a photo of the digit {}."
TEXTS = ["a photo of the digit seven.", "handwritten 3", "the number zero written by hand"]
SMALL = {k: v for k, v in ENCODER.items() if k != "attention_probs_dropout_prob" and k != "hidden_dropout_prob"}
PAIRS = {
    "clip": ({"model_type": "clip_vision_model", "image_size": 16, "patch_size": 4, **SMALL},
             {"model_type": "clip_text_model", "vocab_size": 256, "max_position_embeddings": 16, **SMALL}, {}),
    "vit_bert": ({"model_type": "vit", "image_size": 16, "patch_size": 4, **ENCODER},
                 {"model_type": "bert", "vocab_size": 256, "max_position_embeddings": 16, **ENCODER}, {}),
    # SigLIP: no mmcl heads (its text tower ends in its own head), 64-token prompts as the pipeline pads them.
    "siglip": ({"model_type": "siglip_vision_model", "image_size": 16, "patch_size": 4, **SMALL},
               {"model_type": "siglip_text_model", "vocab_size": 256, "max_position_embeddings": 64, **SMALL},
               {"objectives": {"siglip": 1.0}, "projection": "none", "context_length": 64}),
}
ARCHITECTURE = {"clip": "CLIPModel", "vit_bert": "VisionTextDualEncoderModel", "siglip": "SiglipModel"}
LAUNCHED = {"vit_bert"}  # 2 ranks under the deepspeed launcher; the other pairs train on one rank, `python train.py`


def pair_config(digits: Path, out: Path, pair: str) -> dict:
    image, text, extra = PAIRS[pair]
    config = tiny_run_config(digits, out, steps=3)
    config["model"]["image"] = {"config": image}
    config["model"]["text"] = {"config": text, "tokenizer": str(digits / "tokenizer"),
                               "context_length": extra.get("context_length", 16)}
    if "projection" in extra:
        for side in ("image", "text"):
            config["model"][side]["projection"] = extra["projection"]
        config["model"]["logit_bias_init"] = -10.0
    if "objectives" in extra:
        config["objectives"] = extra["objectives"]
    config["eval"] = {"zeroshot_shards": str(digits / "classification" / "00000.tar"), "batch_size": 180}
    return config


@pytest.fixture(scope="module")
def exports(digits, tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """pair -> (run dir, export dir, the launch's stdout)."""
    from mmcl.cli import main

    out = {}
    for pair in PAIRS:
        root = tmp_path_factory.mktemp(f"consumer_{pair}")
        config = write_config(root / "run.yaml", pair_config(digits, root / "run", pair))
        result = run(deepspeed_command(config) if pair in LAUNCHED else python_command(config))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # `mmcl export` in this process (torch and transformers are loaded here already): what the
        # checks read is the export; the command's own process is tested in test_export.py
        assert main(["export", "--run", str(root / "run"), "--out", str(root / "export")]) == 0
        out[pair] = (root / "run", root / "export", result.stdout)
    return out


@pytest.fixture(scope="module")
def test_images(digits, tmp_path_factory) -> tuple[list[Path], list[int]]:
    """The first 40 held-out digits as PNG files (16 px: both processors leave them unresized) and their labels."""
    folder = tmp_path_factory.mktemp("consumer_images")
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(digits / "classification" / "00000.tar") as archive:
        for member in archive:
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    paths, labels = [], []
    for key, files in list(samples.items())[:40]:
        (folder / f"{key}.png").write_bytes(files["png"])
        paths.append(folder / f"{key}.png")
        labels.append(int(files["cls"]))
    return paths, labels


@pytest.fixture(scope="module")
def consumer_views(exports, test_images, digits, tmp_path_factory) -> dict[str, dict]:
    """pair -> what tests/e2e/hf_consumer.py saw of its export: one fresh process (transformers only) for the three."""
    folder = tmp_path_factory.mktemp("consumer_views")
    images, _ = test_images
    classnames = (digits / "classification" / "classnames.txt").read_text().splitlines()
    request = folder / "request.json"
    request.write_text(json.dumps({"images": [str(p) for p in images], "texts": TEXTS, "classnames": classnames,
                                   "template": TEMPLATE}))
    arguments = [str(a) for pair in sorted(exports) for a in (exports[pair][1], request, folder / f"{pair}.json")]
    consumer = subprocess.run([sys.executable, str(Path(__file__).parent / "hf_consumer.py"), *arguments], cwd=folder,
                              env=env(), capture_output=True, text=True, timeout=600)
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    return {pair: json.loads((folder / f"{pair}.json").read_text()) for pair in exports}


def mmcl_view(run_dir: Path, images: list[Path], classnames: list[str]):
    """mmcl's own unit embeddings of the images and TEXTS, and its zero-shot top-1 class per image."""
    from PIL import Image

    from mmcl.evaluation.loading import eval_transform, text_encoder
    from mmcl.model_dir import load_mmcl_model_dir
    from mmcl.evaluation.zeroshot import build_zeroshot_classifier, zeroshot_scores
    from mmcl.models import tokenize

    model, config, tokenizer = load_mmcl_model_dir(run_dir / "model")
    transform = eval_transform(config.data.image_size, config.data.image_mean, config.data.image_std)
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in images])
    tokens = tokenize(tokenizer, TEXTS, config.model.text.context_length)
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    encode = text_encoder(model, tokenizer, config.model.text.context_length)
    classifier = build_zeroshot_classifier(encode, classnames, [TEMPLATE])
    return image_embeds, text_embeds, zeroshot_scores(image_embeds, classifier).argmax(dim=1).tolist()


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_plain_transformers_reproduces_the_default_export(exports, consumer_views, test_images, digits, pair):
    run_dir, export, _ = exports[pair]
    images, _ = test_images
    classnames = (digits / "classification" / "classnames.txt").read_text().splitlines()
    info = json.loads((export / "mmcl_export.json").read_text())
    assert info["architecture"] == ARCHITECTURE[pair] and info["image"]["exact"] and info["text"]["exact"]

    seen = consumer_views[pair]
    assert not seen["mmcl_imported"] and seen["architecture"] == ARCHITECTURE[pair]

    image_embeds, text_embeds, predictions = mmcl_view(run_dir, images, classnames)
    torch.testing.assert_close(torch.tensor(seen["image_embeds"]), image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(seen["text_embeds"]), text_embeds, atol=1e-5, rtol=0)
    assert seen["pipeline"] == [classnames[i] for i in predictions]
    scores = seen["pipeline_scores"]
    if pair == "siglip":  # independent sigmoid probabilities
        assert all(0 < s < 1 for row in scores for s in row) and any(abs(sum(row) - 1) > 1e-3 for row in scores)
    else:  # a softmax over the candidates
        assert all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in scores)
    # the card's snippets run as written: embeddings/probabilities, then the pipeline
    assert len(seen["snippets"]) == 2 and "tensor(" in seen["snippets"][0] and "'label'" in seen["snippets"][1]


def test_transformers_zero_shot_top1_equals_mmcls_on_the_clip_export(exports, digits, tmp_path):
    """eval/transformers_zeroshot.py (transformers only, every template) gives the run's own zero-shot top-1."""
    run_dir, export, _ = exports["clip"]
    result = subprocess.run([sys.executable, str(REPO / "eval" / "transformers_zeroshot.py"), "--model", str(export),
                             "--data", str(digits / "classification")], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert plain["images"] == 360 and plain["acc1"] == metrics["zeroshot/acc1"]


def test_exports_name_no_place_on_this_machine(exports):
    """No local path in any exported file: not the run's folder, the data's, the repo's or the home directory."""
    for pair, (run_dir, export, _) in exports.items():
        forbidden = {str(run_dir.parent.parent), str(REPO), os.path.expanduser("~"), os.getcwd()}
        for path in export.rglob("*"):
            if path.is_file() and path.suffix not in (".safetensors", ".png", ".model"):
                text = path.read_text(errors="replace")
                for place in forbidden:
                    assert place not in text, (pair, path.name, place)
        source = json.loads((export / "mmcl_export.json").read_text())["source"]
        assert source["path"] == "model/model.safetensors" or not source["path"].startswith("/")


def test_run_records_device_world_size_precision_and_wall_time_and_the_card_shows_them(exports):
    run_dir, export, stdout = exports["vit_bert"]
    hardware = json.loads((run_dir / "metrics.json").read_text())["hardware"]
    assert hardware["world_size"] == 2 and hardware["precision"] == "fp32" and "CPU ranks" in hardware["device"]
    assert json.loads((run_dir / "metrics.json").read_text())["wall_time_s"] > 0
    card = (export / "README.md").read_text()
    assert f"| device | {hardware['device']} |" in card and "| precision | fp32 |" in card and "| wall time |" in card
    assert "not recorded" not in card
    assert "warning:" not in stdout  # defaults export exactly: nothing to warn about at start-up
