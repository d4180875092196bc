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
