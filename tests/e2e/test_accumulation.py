"""Feature-cache accumulation under the real launcher: k micro-batches == one k-times-larger batch.

The measurement (tests/e2e/accumulation_equivalence.py) runs in the session's one launch of
tests/e2e/in_process_checks.py (the `in_process_checks` fixture), one result per ZeRO stage.
"""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_feature_cache_step_equals_one_large_batch_step(stage, in_process_checks):
    measured = in_process_checks["accumulation"][str(stage)]
    assert measured["max_diff"] < 1e-5, measured
    # the step did move the logit scale (its gradient was applied once, not k times or never)
    assert measured["logit_scale_change"] > 1e-3
