"""NaFlex with a token budget under the real launcher: a step over 2 ranks == the step in one process.

One `deepspeed --num_gpus 2` launch of tests/e2e/naflex_budget_equivalence.py (gloo, float64, tiny SigLIP 2
towers, the siglip loss all-gathered, feature-cache accumulation over 2 micro-batches): for each step of
an epoch of mixed-aspect images, the loss and every parameter's gradient equal those of one process over
the step's concatenated batch to 1e-10 — but the image tower's position embedding, whose gradient
transformers' Siglip2 computes in float32 (its grid resize), to float32 rounding.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from siglip2_source import mixed_images, write_caption_shard  # noqa: E402

SIZES = [(40, 16), (16, 40), (32, 32), (90, 20), (20, 56), (64, 24)]  # (width, height)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from launch import BIN, REPO, free_port, run

    folder = tmp_path_factory.mktemp("naflex_budget")
    captions = [f"a photo of object {i}" for i in range(24)]
    shard = write_caption_shard(folder, mixed_images([SIZES[i % len(SIZES)] for i in range(24)]), captions)
    out = folder / "results.json"
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  str(REPO / "tests" / "e2e" / "naflex_budget_equivalence.py"), str(shard), str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.e2e
def test_token_budget_steps_over_two_ranks_equal_one_process_over_the_concatenated_batch(measured):
    # 24 samples // (mean of 32 // 8 = 4 and 32 // 16 = 2 images x 2 ranks) = 4 micro-batches per rank: 2 steps
    assert measured["reference_steps"] == measured["steps_run"] == 2
    steps = measured["steps"]
    assert {step["length"] for step in steps} == {8, 16}  # both sequence lengths occur
    for step in steps:
        images = 32 // step["length"]
        assert step["images_per_micro_batch"] == [images, images]  # budget // L, both micro-batches of the step
        assert step["global_batch"] == images * 2 * 2  # x 2 micro-batches x 2 ranks
        assert step["same_samples"] and step["grad_names_equal"] and step["dtype"] == "torch.float64"
        assert step["loss_diff"] < 1e-10, step
        assert step["grad_max_diff"] < 1e-10, json.dumps(step)
        assert step["grad_max_abs"] > 1e-3  # the gradients compared are not all zero
        # the position grid's gradient goes through transformers' float32 resize: equal to float32 rounding
        assert step["position_embedding_diff"] < 1e-6 * step["position_embedding_max_abs"], json.dumps(step)


@pytest.mark.e2e
def test_a_token_budget_run_logs_each_steps_real_global_batch_and_counts_its_samples(tmp_path):
    """`python train.py` (one rank, ZeRO 2) with sequence lengths [8, 16] and a budget of 32 tokens: every
    step logs its length, its global batch (32 // L images x 2 micro-batches), and `samples` adds them up."""
    from launch import python_command, run, write_config
    from siglip2_source import gemma_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from naflex_budget_equivalence import TEXT, VISION

    captions = [f"a photo of object {i}" for i in range(24)]
    shard = write_caption_shard(tmp_path, mixed_images([SIZES[i % len(SIZES)] for i in range(24)]), captions)
    gemma_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    config = {
        "model": {"image": {"config": VISION}, "text": {"config": TEXT, "tokenizer": str(tmp_path / "tokenizer"),
                                                        "context_length": 8},
                  "embed_dim": 16, "logit_bias_init": -10.0, "logit_scale_init": 10.0},
        "objectives": {"siglip": 1.0},
        "data": {"train_shards": str(shard), "num_workers": 1, "shuffle_buffer": 8, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3,
                 "naflex": {"patch_size": 8, "max_num_patches": 16, "sequence_lengths": [8, 16], "token_budget": 32}},
        "train": {"micro_batch_size": 3, "grad_accum_steps": 2, "epochs": 1, "log_every": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "output_dir": str(tmp_path / "run"), "seed": 0,
    }
    result = run(python_command(write_config(tmp_path / "run.yaml", config)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    # 24 samples // (mean of 4 and 2 images) = 8 micro-batches: 4 steps of 2
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["sequence_length"] for r in records} == {8, 16}
    assert [r["global_batch"] for r in records] == [32 // r["sequence_length"] * 2 for r in records]
    running = 0
    for record in records:
        running += record["global_batch"]
        assert record["samples"] == running
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["samples_seen"] == running
    assert "length 16 | batch 4" in result.stdout + result.stderr or "length 8 | batch 8" in result.stdout + result.stderr
