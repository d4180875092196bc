"""OpenCLIP interop: OpenCLIP -> transformers CLIPModel (convert), a run started from it (init_from),
mmcl -> OpenCLIP's hub layout (export --format openclip), and CLIP_benchmark on an mmcl-trained model.

OpenCLIP models are random-init tiny architectures with ViT-B-32's structure (GELU and QuickGELU),
saved locally; nothing is downloaded. Images are the real handwritten digits of the demo dataset.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_helpers import build, run_config, write_run
from PIL import Image

from mmcl.cli import main as mmcl_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from launch import deepspeed_command, run, write_config  # noqa: E402

TOLERANCE = 1e-5
ARCHITECTURES = {  # ViT-B-32's structure at a tiny size; OpenCLIP's own vocabulary (49408)
    "tiny-ViT": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "tiny-ViT-quickgelu": {"embed_dim": 24, "quick_gelu": True,
                           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}
CAPTIONS = [
    "a photo of the digit 7.",
    "A Handwritten  ZERO,\ton a white background!",
    "the number three written by hand; it's blurry",
    "two (2)",
    "a very long caption " + " ".join(f"with word {i}" for i in range(30)) + " that gets truncated",
]
CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(count: int = 20, size: int = 40) -> tuple[list[Image.Image], list[int]]:
    """Real handwritten digits (sklearn's), upscaled to size x size RGB."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC).convert("RGB")
              for i in range(count)]
    return images, [int(y) for y in data.target[:count]]


@pytest.fixture(scope="module")
def openclip_checkpoints(tmp_path_factory):
    """name -> (config JSON, weights file) of random-init OpenCLIP models, perturbed so no weight is at its init value."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("openclip")
    out = {}
    for seed, (name, cfg) in enumerate(ARCHITECTURES.items()):
        config = root / f"{name}.json"
        config.write_text(json.dumps(cfg))
        open_clip.add_model_config(str(config))
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
            model.logit_scale.fill_(np.log(42.0))
        weights = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        out[name] = (config, weights)
    return out


@pytest.fixture(scope="module")
def converted(openclip_checkpoints, tmp_path_factory):
    """name -> CLIPModel folder written by `mmcl convert openclip`."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, (config, weights) in openclip_checkpoints.items():
        assert mmcl_main(["convert", "openclip", "--model", name, "--config", str(config), "--weights", str(weights),
                          "--out", str(root / name)]) == 0
        out[name] = root / name
    return out


def openclip_model(name, openclip_checkpoints):
    import open_clip

    config, weights = openclip_checkpoints[name]
    open_clip.add_model_config(str(config))
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_converted_clip_model_reproduces_openclip_embeddings_and_zero_shot(name, openclip_checkpoints, converted):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    oc, preprocess, oc_tokenizer = openclip_model(name, openclip_checkpoints)
    hf = CLIPModel.from_pretrained(str(converted[name])).eval()
    # PIL's bicubic resize, as OpenCLIP's preprocess (transformers 5 defaults to its torchvision backend, see below)
    image_processor = AutoImageProcessor.from_pretrained(str(converted[name]), backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(str(converted[name]))
    images, _ = digits()
    prompts = [f"a photo of the digit {c}." for c in CLASSNAMES]
    with torch.no_grad():  # each side with its own preprocessing and tokenizer, as their users would
        oc_images = oc.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        oc_texts = oc.encode_text(oc_tokenizer(CAPTIONS + prompts), normalize=True)
        hf_images = F.normalize(features(hf.get_image_features(**image_processor(images=images, return_tensors="pt"))), dim=-1)
        tokens = tokenizer(CAPTIONS + prompts, padding="max_length", truncation=True, max_length=20, return_tensors="pt")
        hf_texts = F.normalize(features(hf.get_text_features(input_ids=tokens["input_ids"],
                                                             attention_mask=tokens["attention_mask"])), dim=-1)
    image_diff, text_diff = (oc_images - hf_images).abs().max().item(), (oc_texts - hf_texts).abs().max().item()
    print(f"{name}: OpenCLIP -> transformers max |diff| image {image_diff:.2e} text {text_diff:.2e}")
    assert image_diff <= TOLERANCE and text_diff <= TOLERANCE
    n = len(CAPTIONS)
    assert torch.equal((oc_images @ oc_texts[n:].T).argmax(1), (hf_images @ hf_texts[n:].T).argmax(1))
    assert hf.logit_scale.exp().item() == pytest.approx(42.0, rel=1e-6)
    # The torchvision backend's bicubic differs from PIL's by a few 1e-3 per pixel: measured, not hidden.
    default = AutoImageProcessor.from_pretrained(str(converted[name]), backend="torchvision")
    with torch.no_grad():
        tv_images = F.normalize(features(hf.get_image_features(**default(images=images, return_tensors="pt"))), dim=-1)
    print(f"{name}: image embeddings through the torchvision-backend processor: max |diff| "
          f"{(oc_images - tv_images).abs().max().item():.2e}")
    report = json.loads((converted[name] / "openclip_conversion.json").read_text())
    assert report["image_processor"]["pil_max_abs_diff"] == 0.0  # PIL bicubic, as OpenCLIP's preprocess
    assert report["image_processor"]["torchvision_max_abs_diff"] < 0.05


def test_converted_tokenizer_gives_openclip_ids_with_eot_last_when_truncated(converted):
    import open_clip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(converted["tiny-ViT"]))
    ours = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    theirs = open_clip.tokenize(CAPTIONS, context_length=20)
    kept = ours["attention_mask"].bool()
    assert torch.equal(kept, theirs != 0)  # the same tokens kept; OpenCLIP pads with 0, transformers masks its padding
    assert torch.equal(ours["input_ids"][kept], theirs[kept])
    assert ours["input_ids"][-1, -1].item() == theirs[-1, -1].item() == tokenizer.eos_token_id  # truncated: EOT kept last


def test_run_started_with_init_from_has_openclip_embeddings_and_logit_scale_at_step_0(openclip_checkpoints, converted, tmp_path):
    from mmcl.config import load_config
    from mmcl.models import build_tokenizer, tokenize
    from mmcl.pretrained import build_model

    path = write_config(tmp_path / "run.yaml", {"model": {"init_from": str(converted["tiny-ViT-quickgelu"])},
                                                "output_dir": str(tmp_path / "out")})
    config = load_config(path)
    assert (config.model.embed_dim, config.model.text.context_length, config.data.image_size) == (24, 20, 32)
    model = build_model(config.model).eval()
    oc, preprocess, oc_tokenizer = openclip_model("tiny-ViT-quickgelu", openclip_checkpoints)
    images, _ = digits(8)
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        assert (model.encode_image(pixels) - oc.encode_image(pixels, normalize=True)).abs().max() <= TOLERANCE
        ours = model.encode_text(**tokenize(build_tokenizer(config.model.text), CAPTIONS, 20))
        assert (ours - oc.encode_text(oc_tokenizer(CAPTIONS), normalize=True)).abs().max() <= TOLERANCE
        assert model(input_ids=torch.ones(1, 3, dtype=torch.long))["logit_scale"].item() == pytest.approx(42.0, rel=1e-6)


def test_init_from_a_folder_that_is_not_a_clip_model_is_a_one_sentence_config_error(tmp_path):
    from mmcl.config import ConfigError, load_config

    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    path = write_config(tmp_path / "run.yaml", {"model": {"init_from": str(tmp_path / "vit")}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "'model.init_from'" in str(error.value) and "is a 'vit' model" in str(error.value)
    assert str(error.value).count("\n") == 0


def test_openclip_export_loads_in_open_clip_with_mmcl_embeddings(tokenizer_dir, tmp_path):
    import open_clip

    from mmcl.models import tokenize

    config = run_config(tokenizer_dir, image="clip_vision_model", text="clip_text_model", image_pooling="pooler_output",
                        text_pooling="eos")
    model, tokenizer = build(config)
    run_dir = write_run(tmp_path / "run", config, model, tokenizer)
    assert mmcl_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "oc"), "--format", "openclip"]) == 0
    folder = tmp_path / "oc"
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    texts = ["a photo of the digit seven", "handwritten three", "number zero written by hand"]
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_image = model.encode_image(pixels)
        expected_text = model.encode_text(**tokenize(tokenizer, texts, 12))
    # As an hf-hub-style folder (local-dir:), and as a registered config + pretrained= file.
    hub_config = json.loads((folder / "open_clip_config.json").read_text())
    (tmp_path / "mmcl-tiny.json").write_text(json.dumps(hub_config["model_cfg"]))
    open_clip.add_model_config(str(tmp_path / "mmcl-tiny.json"))
    for name, pretrained in ((f"local-dir:{folder}", None), ("mmcl-tiny", str(folder / "open_clip_model.safetensors"))):
        oc, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        oc.eval()
        oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        with torch.no_grad():
            image_diff = (oc.encode_image(pixels, normalize=True) - expected_image).abs().max().item()
            text_diff = (oc.encode_text(oc_tokenizer(texts), normalize=True) - expected_text).abs().max().item()
        print(f"{name}: mmcl -> OpenCLIP max |diff| image {image_diff:.2e} text {text_diff:.2e}")
        assert image_diff <= TOLERANCE and text_diff <= TOLERANCE
        assert oc.logit_scale.exp().item() == pytest.approx(float(np.exp(2.5)), rel=1e-6)


@pytest.mark.parametrize("name, words", [("coca_ViT-B-32", "multimodal decoder (CoCa)"), ("RN50", "ModifiedResNet"),
                                         ("ViT-B-16-SigLIP", "logit bias"), ("convnext_base", "timm image tower"),
                                         ("roberta-ViT-B-32", "Hugging Face text encoder")])
def test_convert_refuses_other_openclip_architectures_in_one_sentence(name, words, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert mmcl_main(["convert", "openclip", "--model", name, "--weights", str(weights), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmcl: error: not supported:") and words in error and error.count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_openclip_export_refuses_towers_openclip_cannot_hold(tokenizer_dir, tmp_path, capsys):
    config = run_config(tokenizer_dir, image="vit", text="bert")
    model, tokenizer = build(config)
    run_dir = write_run(tmp_path / "run", config, model, tokenizer)
    assert mmcl_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "oc"), "--format", "openclip"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mmcl: error: not supported in OpenCLIP format: image tower ViTModel") and error.count("\n") == 0


# ----------------------------------------------------------------------------- a real run, CLIP_benchmark


def clip_benchmark_layout(root: Path, shard: Path, samples: int = 150) -> Path:
    """CLIP_benchmark's wds layout: test/0.tar + nshards.txt, classnames.txt, zeroshot_classification_templates.txt.

    test/0.tar holds the first `samples` samples ({key}.png + {key}.cls) of `shard`."""
    import tarfile

    (root / "test").mkdir(parents=True)
    with tarfile.open(shard) as source, tarfile.open(root / "test" / "0.tar", "w") as target:
        keys: list[str] = []
        for member in source.getmembers():
            key = member.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
            if len(keys) > samples:
                break
            target.addfile(member, source.extractfile(member))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of the digit {c}.\nhandwritten {c}\n")
    return root


@pytest.mark.e2e
def test_zero3_run_from_converted_openclip_then_clip_benchmark_agrees_with_mmcl_zeroshot(openclip_checkpoints, converted,
                                                                                        tmp_path):
    """One deepspeed launch (2 CPU ranks, ZeRO-3) started with model.init_from on a converted OpenCLIP model,
    6 steps; its first logged logit scale is OpenCLIP's. The trained model, exported to OpenCLIP's format,
    is scored by CLIP_benchmark's own CLI and by mmcl-zeroshot on the same wds set: same top-1."""
    from data_tools.demo_dataset import build_demo

    from mmcl.evaluation.cli import run_zeroshot

    data = tmp_path / "digits"
    build_demo(data, image_size=32, samples_per_shard=400)
    config = {
        "model": {"init_from": str(converted["tiny-ViT"])},
        "data": {"train_shards": str(data / "train" / "{00000..00003}.tar"), "shuffle_buffer": 64, "num_workers": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 1},  # large: 6 steps should move a random model off one constant class
        "train": {"micro_batch_size": 16, "steps": 6, "log_every": 1},
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
    }
    result = run(deepspeed_command(write_config(tmp_path / "run.yaml", config), "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first = next(r for r in records if "logit_scale" in r)
    assert first["step"] == 1 and first["logit_scale"] == pytest.approx(42.0, rel=1e-5)  # the forward value of step 1

    assert mmcl_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "oc"), "--format", "openclip"]) == 0
    wds = clip_benchmark_layout(tmp_path / "wds_digits", data / "classification" / "00000.tar")
    # clip_benchmark's CLI, through a wrapper that fixes its one NumPy >= 2.4 incompatibility (see the file)
    command = [sys.executable, str(Path(__file__).with_name("clip_benchmark_cli.py")), "eval", "--model_type", "open_clip",
               "--model", f"local-dir:{tmp_path / 'oc'}", "--pretrained", "none", "--dataset", "wds/digits",
               "--dataset_root", str(wds), "--task", "zeroshot_classification", "--batch_size", "64", "--num_workers", "0",
               "--output", str(tmp_path / "clip_benchmark.json"),
               "--no_amp"]  # CLIP_benchmark autocasts by default (bf16 on a CPU); mmcl-zeroshot runs in float32
    benchmark = subprocess.run(command, capture_output=True, text=True, timeout=600)  # generous: shared, loaded CI machines
    assert benchmark.returncode == 0, benchmark.stdout[-2000:] + benchmark.stderr[-2000:]
    theirs = json.loads((tmp_path / "clip_benchmark.json").read_text())["metrics"]
    result = run_zeroshot(["--model", str(tmp_path / "run" / "model"), "--data", str(wds / "test" / "0.tar"),
                           "--classnames", str(wds / "classnames.txt"),
                           "--templates", str(wds / "zeroshot_classification_templates.txt"),
                           "--device", "cpu", "--workers", "0", "--batch-size", "64"])
    ours = result["metrics"]
    print(f"CLIP_benchmark {theirs}, mmcl-zeroshot {ours}")
    assert result["num_samples"] == 150
    # A 6-step model is near chance; top-5 and per-class recall pin that the two rank the classes alike.
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs[metric] == pytest.approx(ours[metric], abs=1e-9), metric

    # Per sample: CLIP_benchmark's own loader, dataset builder, classifier and scores vs mmcl's.
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as benchmark_zeroshot
    from clip_benchmark.models import load_clip

    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.loading import mmcl_eval_model
    from mmcl.evaluation.zeroshot import build_zeroshot_classifier, zeroshot_scores

    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{tmp_path / 'oc'}", "none", None, "cpu")
    dataset = build_dataset("wds/digits", root=str(wds), transform=transform, split="test", download=False)
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, num_workers=0)
    classifier = benchmark_zeroshot.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    their_logits, their_labels = benchmark_zeroshot.run_classification(model, classifier, loader, "cpu", amp=False)
    mmcl_model = mmcl_eval_model(tmp_path / "run" / "model")
    our_classifier = build_zeroshot_classifier(mmcl_model.encode_text, CLASSNAMES, ["a photo of the digit {c}.", "handwritten {c}"])
    images = extract_features(build_eval_loader(str(wds / "test" / "0.tar"), mmcl_model.transform, 64, 0, None),
                              mmcl_model.encode_image)
    our_scores = zeroshot_scores(images["features"], our_classifier)
    assert torch.equal(their_labels, images["label"])
    score_diff = (their_logits / 100 - our_scores).abs().max().item()
    print(f"per-sample cosine scores, CLIP_benchmark vs mmcl: max |diff| {score_diff:.2e}")
    assert score_diff <= TOLERANCE
