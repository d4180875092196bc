"""`mmcl wise-ft`: weight interpolation of a zero-shot and a fine-tuned model, exact exports, the α sweep."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import build, run_config, write_run
from PIL import Image
from safetensors.torch import load_file

from mmcl.cli import main as mmcl_main
from mmcl.export.export import export_run
from mmcl.export.hf_loader import load_exported
from mmcl.export.wise_ft import load_input

PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
CLIP_TOWERS = dict(image="clip_vision_model", text="clip_text_model", image_pooling="pooler_output", text_pooling="eos")


@pytest.fixture(scope="module")
def pair(tokenizer_dir, tmp_path_factory):
    """Model dirs and exports of a "zero-shot" and a "fine-tuned" model of one architecture (different weights)."""
    root = tmp_path_factory.mktemp("wise")
    config = run_config(tokenizer_dir, **CLIP_TOWERS)
    made = {}
    for name, seed in (("zero_shot", 0), ("fine_tuned", 1)):
        model, tokenizer = build(config, seed=seed)
        with torch.no_grad():
            model.logit_scale.fill_(2.0 + seed)
        model_dir = write_run(root / name, config, model, tokenizer) / "model"
        made[name] = {"model_dir": model_dir, "export": export_run(model_dir, root / f"{name}_export"), "model": model}
    return made


def export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / "mmcl_heads.safetensors"))}


@pytest.mark.parametrize("inputs", ["model_dir", "export"])
def test_wise_ft_at_alpha_0_and_1_reproduces_its_inputs_bit_for_bit_and_0_5_is_the_mean(pair, tmp_path, inputs):
    out = tmp_path / "wise"
    assert mmcl_main(["wise-ft", "--zero-shot", str(pair["zero_shot"][inputs]), "--fine-tuned", str(pair["fine_tuned"][inputs]),
                      "--alpha", "1", "--alpha", "0", "--alpha", "0.5", "--out", str(out)]) == 0
    info = json.loads((out / "mmcl_wise_ft.json").read_text())
    assert info["alphas"] == [0.0, 0.5, 1.0] and info["exports"] == {"0": "alpha_0", "0.5": "alpha_0.5", "1": "alpha_1"}
    for alpha, name in ((0, "zero_shot"), (1, "fine_tuned")):
        ours, theirs = export_tensors(out / f"alpha_{alpha}"), export_tensors(pair[name]["export"])
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        exported = load_exported(out / f"alpha_{alpha}")
        with torch.no_grad():
            assert torch.equal(exported.encode_image(PIXELS), pair[name]["model"].encode_image(PIXELS))
            tokens = exported.tokenize(["a photo of the digit seven", "handwritten three"])
            assert torch.equal(exported.encode_text(**tokens), pair[name]["model"].encode_text(**tokens))
    half = load_input(out / "alpha_0.5", "--zero-shot").model.state_dict()
    zero, one = (pair[name]["model"].state_dict() for name in ("zero_shot", "fine_tuned"))
    assert half.keys() == zero.keys()
    for key in half:
        assert torch.equal(half[key], (zero[key] + one[key]) / 2), key


def test_wise_ft_takes_the_transformers_clip_model_a_fine_tune_started_from(pair, tmp_path):
    """--zero-shot may be the plain CLIPModel folder (or hub id) that `model.init_from` named."""
    import shutil

    from mmcl.config import from_dict
    from mmcl.model_dir import save_model_dir
    from mmcl.models import build_tokenizer
    from mmcl.pretrained import build_model

    plain = tmp_path / "hub_clip"  # what a user downloads: the export less mmcl's own files
    shutil.copytree(pair["zero_shot"]["export"], plain, ignore=shutil.ignore_patterns("mmcl_*"))
    assert json.loads((plain / "config.json").read_text())["model_type"] == "clip"
    config = from_dict({"model": {"init_from": str(plain)}, "objectives": {"clip": 1.0}}, source="test")
    tuned = build_model(config.model)  # a "fine-tune" started from it: its weights moved a little
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    tuned_dir = save_model_dir(tuned, config, build_tokenizer(config.model.text), tmp_path / "tuned")
    out = tmp_path / "wise"
    assert mmcl_main(["wise-ft", "--zero-shot", str(plain), "--fine-tuned", str(tuned_dir),
                      "--alpha", "0", "--alpha", "0.5", "--out", str(out)]) == 0
    start = pair["zero_shot"]["model"]
    exported = load_exported(out / "alpha_0")
    with torch.no_grad():  # alpha 0 is the CLIPModel itself, which is the zero-shot model's export
        assert torch.allclose(exported.encode_image(PIXELS), start.encode_image(PIXELS), atol=1e-5)
    half = load_input(out / "alpha_0.5", "--zero-shot").model.state_dict()
    zero, one = load_input(plain, "--zero-shot").model.state_dict(), tuned.state_dict()
    assert half.keys() == one.keys()
    assert all(torch.allclose(half[key], (zero[key] + one[key]) / 2, atol=1e-7) for key in half)


def test_wise_ft_refuses_models_of_different_architectures_in_one_sentence(pair, tokenizer_dir, tmp_path, capsys):
    config = run_config(tokenizer_dir, **CLIP_TOWERS, embed_dim=16)
    other = write_run(tmp_path / "other", config, *build(config)) / "model"
    code = mmcl_main(["wise-ft", "--zero-shot", str(pair["zero_shot"]["model_dir"]), "--fine-tuned", str(other),
                      "--alpha", "0.5", "--out", str(tmp_path / "wise")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and not (tmp_path / "wise").exists()
    assert "differ in their weight 'image_projection.weight' ((24, 32) vs (16, 32)); WiSE-FT mixes the weights" in error


def test_wise_ft_refuses_an_alpha_outside_0_1_before_any_work(pair, tmp_path, capsys):
    code = mmcl_main(["wise-ft", "--zero-shot", str(pair["zero_shot"]["model_dir"]), "--fine-tuned",
                      str(pair["fine_tuned"]["model_dir"]), "--alpha", "1.5", "--out", str(tmp_path / "wise")])
    assert code == 2 and "--alpha 1.5 is outside [0, 1]" in capsys.readouterr().err


def image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int = 3) -> Path:
    """root/<class>/<i>.png: noisy images around one colour per class."""
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_wise_ft_eval_prints_the_sweep_and_writes_its_json_and_plot(pair, tmp_path, capsys):
    target = image_folder(tmp_path / "target", {"cat": (200, 40, 40), "dog": (40, 200, 40)})
    held_out = image_folder(tmp_path / "held_out", {"one": (40, 40, 200), "two": (200, 200, 40), "three": (40, 200, 200)})
    out = tmp_path / "wise"
    assert mmcl_main(["wise-ft", "--zero-shot", str(pair["zero_shot"]["model_dir"]), "--fine-tuned",
                      str(pair["fine_tuned"]["model_dir"]), "--alpha", "0", "--alpha", "0.5", "--alpha", "1",
                      "--out", str(out), "--eval", "--data", str(target), "--data", str(held_out),
                      "--templates", str(_templates(tmp_path)), "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    info = json.loads((out / "mmcl_wise_ft.json").read_text())
    sweep = info["sweep"]
    assert [row["alpha"] for row in sweep] == [0.0, 0.5, 1.0] and info["plot"] == "wise_ft.png"
    assert info["datasets"] == {"target": "target", "held_out": ["held_out"]}  # names, no machine paths
    for row in sweep:
        assert row["target"] == row["per_dataset"]["target"] and row["held_out"] == row["per_dataset"]["held_out"]
        assert row["target"] in {0.0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1.0}  # 6 target images
    header = printed.index(next(line for line in printed if line.split()[:3] == ["alpha", "target", "held-out"]))
    assert [line.split()[0] for line in printed[header + 1:header + 4]] == ["0", "0.5", "1"]
    assert float(printed[header + 2].split()[1]) == pytest.approx(sweep[1]["target"], abs=1e-4)
    with Image.open(out / "wise_ft.png") as plot:
        assert plot.format == "PNG" and plot.size[0] >= 400
    # the ends of the sweep are the inputs: their accuracy equals the inputs' own zero-shot accuracy
    from mmcl.evaluation.cli import run_zeroshot

    for alpha, name in ((0.0, "zero_shot"), (1.0, "fine_tuned")):
        alone = run_zeroshot(["--model", str(pair[name]["model_dir"]), "--data", str(target), "--templates",
                              str(_templates(tmp_path)), "--workers", "0", "--device", "cpu"])
        assert alone["metrics"]["acc1"] == next(row["target"] for row in sweep if row["alpha"] == alpha)


def _templates(tmp_path: Path) -> Path:
    path = tmp_path / "templates.txt"
    path.write_text("a photo of the {c}\nhandwritten {c}\n")
    return path


def test_sweep_datasets_get_distinct_names_without_machine_paths(tmp_path):
    from mmcl.export.wise_ft import dataset_names

    for domain in ("digits", "shapes"):
        (tmp_path / domain / "classification").mkdir(parents=True)
    shards = [str(tmp_path / domain / "classification" / "00000.tar") for domain in ("digits", "shapes")]
    assert dataset_names(shards) == ["digits/classification", "shapes/classification"]
    assert dataset_names([str(tmp_path / "digits"), str(tmp_path / "shapes")]) == ["digits", "shapes"]
    assert dataset_names([shards[0], shards[0]]) == [f"{name}#{i}" for i, name in enumerate(["/".join(Path(shards[0]).parent.parts)] * 2)]
    assert dataset_names(["https://user:SECRET@host/d/{00000..00009}.tar"]) == ["d"]
