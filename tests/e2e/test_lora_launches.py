"""LoRA end to end: the real `deepspeed` launcher, 2 CPU ranks, ZeRO 1/2/3, ViT + BERT with adapters on both.

One 8-step reference run per stage (checkpoints every 4) serves every check: ZeRO-1 steps a
global batch of 32 in one micro-batch per rank, ZeRO-2 and ZeRO-3 in two accumulated by
feature caching, so equal losses across stages pin the feature cache with adapters; each
stage's step-4 checkpoint resumed at 2 ranks reproduces steps 5-8; the ZeRO-2 checkpoint
resumed at 1 rank (elastic; as `python train.py`: one rank needs no launcher) loads the same
adapters, heads and Adam moments; the checkpoints hold optimizer state for adapters and heads
alone; the ZeRO-2 run exported with `mmcl export` gives mmcl's embeddings and zero-shot
predictions in a process that imports only transformers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import deepspeed_command, env, losses, python_command, resume_copy, run, tiny_run_config, write_config
from test_elastic_resume_launches import universal_state
from test_hub_consumers import PAIRS, TEMPLATE, TEXTS, mmcl_view, test_images  # noqa: F401 (fixture)

STAGES = {1: "configs/ds/zero1.json", 2: "configs/ds/zero2.json", 3: "configs/ds/zero3.json"}
BATCHING = {1: (16, 1), 2: (8, 2), 3: (8, 2)}  # (micro batch, accumulation) per rank: global batch 32 each
HEADS = ("image_projection.", "text_projection.", "logit_scale")


def lora_config(digits: Path, out: Path, stage: int) -> dict:
    """ViT + BERT with auto poolings (both exact in transformers), rank-4 adapters on each tower."""
    image, text, _ = PAIRS["vit_bert"]
    micro, accumulation = BATCHING[stage]
    config = tiny_run_config(digits, out, steps=8, checkpoint_every=4, keep_checkpoints=4, micro_batch_size=micro,
                             grad_accum_steps=accumulation)
    config["model"]["image"] = {"config": image, "lora": {"rank": 4, "alpha": 8}}
    config["model"]["text"] = {"config": text, "tokenizer": str(digits / "tokenizer"), "context_length": 16,
                               "lora": {"rank": 4, "alpha": 8}}
    config["optim"]["lr"] = 5e-3
    return config


@pytest.fixture(scope="module")
def lora_runs(digits, tmp_path_factory):
    """stage -> (config path, reference run dir, resumed run dir); plus "elastic": the 1-rank resume of ZeRO-2."""
    runs: dict = {}
    for stage, ds_json in STAGES.items():
        root = tmp_path_factory.mktemp(f"lora_zero{stage}")
        config = write_config(root / "run.yaml", lora_config(digits, root / "run", stage))
        result = run(deepspeed_command(config, ds_json))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        resumed = resume_copy(root / "run", root / "resumed")
        result = run(deepspeed_command(config, ds_json, 2, f"output_dir={resumed}", "train.resume=latest"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[stage] = (config, root / "run", resumed)
    config, reference, _ = runs[2]
    elastic = resume_copy(reference, reference.parent / "elastic")
    debug = reference.parent / "debug"
    result = run(python_command(config, STAGES[2], f"output_dir={elastic}", "train.resume=latest",
                                "train.micro_batch_size=16"), extra_env={"MMCL_DEBUG_DIR": str(debug)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "elastic resume from" in result.stdout and "world size 2 -> 1" in result.stdout
    runs["elastic"] = (elastic, debug)
    return runs


def test_lora_trains_the_same_under_zero_1_2_3_with_and_without_feature_cache_accumulation(lora_runs):
    from safetensors.torch import load_file

    reference = losses(lora_runs[1][1])
    assert sorted(reference) == list(range(1, 9))
    for stage in (2, 3):  # two micro-batches of 8 per rank, feature-cached, against one of 16
        got = losses(lora_runs[stage][1])
        for step in reference:
            assert got[step] == pytest.approx(reference[step], rel=2e-5), (stage, step, got, reference)
    # the adapters trained (B starts at zero) and the towers' own weights did not move (same seed, same init)
    weights = [load_file(lora_runs[stage][1] / "model" / "model.safetensors") for stage in (1, 2, 3)]
    adapters = [name for name in weights[0] if "lora_B" in name]
    assert len(adapters) == 8 and all(weights[0][name].abs().max() > 1e-4 for name in adapters)
    for name in weights[0]:
        if "_tower." in name and "lora_" not in name:
            assert torch.equal(weights[1][name], weights[0][name]) and torch.equal(weights[2][name], weights[0][name])
        else:
            torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lora_resume_in_the_middle_equals_the_uninterrupted_run(lora_runs, stage):
    _, reference, resumed = lora_runs[stage]
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    from safetensors.torch import load_file

    final, again = load_file(reference / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert final.keys() == again.keys() and any("lora_B" in name for name in final)
    for name in final:
        torch.testing.assert_close(again[name], final[name], atol=1e-6, rtol=0)


def optimizer_state_elements(checkpoint: Path) -> dict[str, int]:
    """Elements of the fp32 master partitions and of AdamW's moments in a ZeRO checkpoint, summed over ranks."""
    counts = {"master": 0, "moments": 0}
    for path in sorted(checkpoint.glob("*optim_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        if "fp32_flat_groups" in state:  # ZeRO-3
            master, adam = state["fp32_flat_groups"], state["optimizer_state_dict"]
        else:  # ZeRO 1/2
            master, adam = state["single_partition_of_fp32_groups"], state["base_optimizer_state"]
        counts["master"] += sum(t.numel() for t in master)
        counts["moments"] += sum(t.numel() for group in adam["state"].values() for key, t in group.items()
                                 if key in ("exp_avg", "exp_avg_sq"))
    return counts


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_only_adapters_and_heads_hold_optimizer_state(lora_runs, stage):
    from safetensors.torch import load_file

    _, reference, _ = lora_runs[stage]
    weights = load_file(reference / "model" / "model.safetensors")
    trainable = sum(t.numel() for name, t in weights.items() if "lora_" in name or name.startswith(HEADS))
    counts = optimizer_state_elements(reference / "checkpoints" / "step_00000004")
    groups = 4  # heads decay / no decay, image adapters, text adapters; each padded by at most one element per rank
    assert trainable <= counts["master"] <= trainable + groups, (counts, trainable)
    assert 2 * trainable <= counts["moments"] <= 2 * (trainable + groups), (counts, trainable)
    assert counts["master"] < 0.1 * sum(t.numel() for t in weights.values())


def test_elastic_lora_resume_loads_the_same_adapters_heads_and_adam_moments(lora_runs, tmp_path):
    _, reference, _ = lora_runs[2]
    saved = universal_state(reference / "checkpoints" / "step_00000004", tmp_path / "saved")
    assert any("lora_B" in name for name in saved)
    assert sum(float(v["exp_avg_sq"].abs().sum()) for name, v in saved.items() if "lora_" in name) > 0
    elastic, debug = lora_runs["elastic"]
    loaded = universal_state(debug / "after_resume", tmp_path / "loaded")
    assert loaded.keys() == saved.keys()
    for name, tensors in saved.items():
        for key, tensor in tensors.items():
            assert torch.equal(loaded[name][key], tensor), (name, key)
    assert sorted(losses(elastic)) == [5, 6, 7, 8]


def test_merged_lora_export_gives_mmcls_embeddings_and_zero_shot_predictions_in_plain_transformers(
        lora_runs, test_images, digits, tmp_path):  # noqa: F811 (fixture)
    _, run_dir, _ = lora_runs[2]
    export = tmp_path / "export"
    from mmcl.cli import main

    # `mmcl export` in this process (mmcl_view below loads the same modules here anyway)
    assert main(["export", "--run", str(run_dir), "--out", str(export), "--peft-adapters"]) == 0
    info = json.loads((export / "mmcl_export.json").read_text())
    assert info["image"]["exact"] and info["text"]["exact"]
    assert {p.name for p in (export / "adapters").iterdir()} == {"image", "text"}
    images, _ = test_images
    classnames = (digits / "classification" / "classnames.txt").read_text().splitlines()
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"images": [str(p) for p in images], "texts": TEXTS, "classnames": classnames,
                                   "template": TEMPLATE}))
    consumer = subprocess.run([sys.executable, str(Path(__file__).parent / "hf_consumer.py"), str(export), str(request),
                               str(tmp_path / "result.json")], cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=300)
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    seen = json.loads((tmp_path / "result.json").read_text())
    assert not seen["mmcl_imported"]
    image_embeds, text_embeds, predictions = mmcl_view(run_dir, images, classnames)
    torch.testing.assert_close(torch.tensor(seen["image_embeds"]), image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(seen["text_embeds"]), text_embeds, atol=1e-5, rtol=0)
    assert seen["pipeline"] == [classnames[i] for i in predictions]
