"""Patch dropout under the real launcher: feature-cache accumulation, ZeRO, bf16, gradient
checkpointing, the unmasked finish and exact resume.

Two launches serve the training checks: one run of 8 steps (ZeRO-3, bf16, 2 micro-batches per
step with feature caching, gradient checkpointing, patch dropout 0.5, the last 2 steps
unmasked, a checkpoint at step 4), and its resume from step 4.
"""
from __future__ import annotations

import json

import pytest

from launch import deepspeed_command, losses, resume_copy, run, tiny_run_config, write_config

STEPS, FINAL_UNMASKED = 8, 2
PATCHES = (16 // 4) ** 2  # tiny_run_config: 16-px images, 4-px patches
MASKED_TOKENS, ALL_TOKENS = 1 + PATCHES // 2, 1 + PATCHES  # class token + kept patches


def test_feature_cache_step_with_patch_dropout_equals_one_large_batch_step_under_zero_1_2_3(in_process_checks):
    """The caching pass and the re-encoding pass keep the same tokens (and the 12-sample step draws the same).
    Measured by accumulation_equivalence.py in the session's in_process_checks.py launch."""
    measured = in_process_checks["accumulation_patch_dropout"]
    for stage in ("1", "2", "3"):
        assert measured[stage]["max_diff"] < 1e-5, measured
        assert measured[stage]["logit_scale_change"] > 1e-3
        # 16-px images, 8-px patches: the class token and 2 of the 4 patches reached the layers
        assert measured[stage]["tokens_reference"] == measured[stage]["tokens_accumulated"] == 3


@pytest.fixture(scope="module")
def patch_dropout_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_dropout")
    config = tiny_run_config(digits, out / "run", steps=STEPS, checkpoint_every=4, keep_checkpoints=4,
                             grad_accum_steps=2, precision="bf16", patch_dropout_final_steps=FINAL_UNMASKED)
    config["train"]["micro_batch_size"] = 8
    config["model"]["image"].update(patch_dropout=0.5, gradient_checkpointing=True)
    path = write_config(out / "run.yaml", config)
    result = run(deepspeed_command(path, "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, out / "run", result


def tokens(output_dir) -> dict[int, int]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["image_tokens"] for r in records if "image_tokens" in r}


def test_patch_dropout_run_drops_tokens_then_finishes_unmasked(patch_dropout_run):
    _, out, result = patch_dropout_run
    assert "patch dropout 0.5: steps 1-6 drop patch tokens, steps 7-8 see every token" in result.stdout
    assert "attention: eager for model.image and model.text (on the CPU in bf16" in result.stdout  # mmcl.engine.attention
    assert tokens(out) == {step: MASKED_TOKENS if step <= STEPS - FINAL_UNMASKED else ALL_TOKENS
                           for step in range(1, STEPS + 1)}
    logged = losses(out)
    assert all(value == value and value < 10 for value in logged.values()), logged  # finite
    assert (out / "model" / "model.safetensors").exists()


def test_resume_keeps_the_same_tokens_and_losses_with_patch_dropout(patch_dropout_run, tmp_path):
    config, out, _ = patch_dropout_run
    resumed = tmp_path / "resumed"
    resume_copy(out, resumed)
    result = run(deepspeed_command(config, "configs/ds/zero3.json", 2, f"output_dir={resumed}", "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected, got = losses(out), losses(resumed)
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:  # steps 5-6 drop tokens: the same ones only if the RNG state was restored
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    assert tokens(resumed) == {5: MASKED_TOKENS, 6: MASKED_TOKENS, 7: ALL_TOKENS, 8: ALL_TOKENS}
