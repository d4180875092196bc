"""Feature-cache accumulation under the real launcher: k micro-batches == one k-times-larger batch."""
from __future__ import annotations

import json

import pytest

from launch import BIN, REPO, free_port, run


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_feature_cache_step_equals_one_large_batch_step(stage, tmp_path):
    out = tmp_path / "result.json"
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  str(REPO / "tests" / "e2e" / "accumulation_equivalence.py"), str(stage), str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads(out.read_text())
    assert measured["max_diff"] < 1e-5, measured
    # the step did move the logit scale (its gradient was applied once, not k times or never)
    assert measured["logit_scale_change"] > 1e-3
