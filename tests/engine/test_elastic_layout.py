"""The layout check of an elastic resume: what changed, and a changed global batch."""
import pytest

from mmcl.engine.checkpoint import ResumeError
from mmcl.engine.elastic import compare, remaining_total_steps

SAVED = {"world_size": 2, "nodes": 1, "micro_batch_size": 8, "grad_accum_steps": 1, "num_workers": 1,
         "global_batch": 16, "zero_stage": 2, "step": 4, "samples_seen": 64, "total_steps": 12}


def now(**changes):
    layout = {k: SAVED[k] for k in ("world_size", "nodes", "micro_batch_size", "grad_accum_steps", "num_workers",
                                    "zero_stage")}
    layout.update(changes)
    layout["global_batch"] = layout["micro_batch_size"] * layout["grad_accum_steps"] * layout["world_size"]
    return layout


def test_same_layout_has_no_changes():
    assert compare(SAVED, now(), allow_batch_change=False) == []


def test_changes_are_named_when_the_global_batch_is_kept():
    changes = compare(SAVED, now(world_size=8, nodes=2, micro_batch_size=1, grad_accum_steps=2, num_workers=4), False)
    assert changes == ["world size 2 -> 8", "nodes 1 -> 2", "data.num_workers 1 -> 4", "train.micro_batch_size 8 -> 1",
                       "train.grad_accum_steps 1 -> 2"]


def test_a_changed_global_batch_is_one_sentence_naming_both_values():
    with pytest.raises(ResumeError) as error:
        compare(SAVED, now(world_size=4), allow_batch_change=False)
    assert str(error.value) == ("the checkpoint was trained with a global batch of 16 and this launch has 32 "
                                "(micro x accumulation x world size); keep 16 or set train.allow_batch_change=true.")


def test_allowed_batch_change_rederives_the_steps_from_the_remaining_samples():
    layout = now(world_size=4)
    assert compare(SAVED, layout, allow_batch_change=True)[-1] == "global batch 16 -> 32"
    # 12 steps x 16 = 192 samples, 64 seen: 128 left = 4 steps of 32 after step 4
    assert remaining_total_steps(SAVED, layout) == 8
    assert remaining_total_steps(SAVED, now(micro_batch_size=4)) == 4 + 128 // 8
