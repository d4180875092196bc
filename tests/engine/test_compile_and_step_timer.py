"""`train.compile`'s start-up checks and the step timer's bookkeeping (no compilation here: the
compiled run itself is tested end to end in tests/e2e/test_compile_and_step_time.py)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from mmcl.config import from_dict
from mmcl.engine.compile import check_compile
from mmcl.engine.runtime import TrainingError
from mmcl.engine.step_timer import StepTimer

VIT = dict(model_type="vit", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=64)


def run_config(**image) -> object:
    return from_dict({"model": {"image": {"config": VIT, "projection": "none", **image}, "embed_dim": 32},
                      "objectives": {"simclr": 1.0}, "train": {"compile": True}})


def test_compile_with_zero_3_is_refused_in_one_sentence_before_any_process_group():
    with pytest.raises(TrainingError, match=r"^train.compile does not work with ZeRO stage 3 .*train.compile: false\.$"):
        check_compile(run_config(), {"zero_optimization": {"stage": 3}})
    assert not dist.is_initialized()


def test_compile_with_zero_2_and_gradient_checkpointing_passes_the_checks():
    check_compile(run_config(gradient_checkpointing=True), {"zero_optimization": {"stage": 2}})
    assert run_config().train.compile is True


def test_nested_phases_charge_their_time_to_the_inner_phase_and_the_window_resets(monkeypatch):
    clock = [100.0]  # a clock the test advances by hand: exact seconds, no sleeping
    monkeypatch.setattr("mmcl.engine.step_timer.time.perf_counter", lambda: clock[0])
    timer = StepTimer("cpu")
    with timer.phase("data"):
        clock[0] += 5.0
    with timer.phase("forward_backward"):
        clock[0] += 2.0
        with timer.phase("optimizer"):
            clock[0] += 3.0
        clock[0] += 1.0
    clock[0] += 1.0  # the loop's bookkeeping: in no phase
    window = timer.window(12.0)
    assert (window["time/data_s"], window["time/forward_backward_s"], window["time/optimizer_s"]) == (5.0, 3.0, 3.0)
    assert window["time/window_s"] == 12.0 and window["time/data_wait_fraction"] == pytest.approx(5 / 12)
    assert window["memory/peak_gb"] > 0
    assert timer.window(1.0)["time/data_s"] == 0.0  # the sums start again
