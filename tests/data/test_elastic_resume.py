"""Elastic resume of the data stream: an epoch interrupted on one layout continues on another.

Ranks are simulated in one process (each loader gets its rank and world size), which is what
the trainer does per process; tests/e2e/test_elastic_resume.py runs the real launcher.
"""
import json
from collections import Counter

import pytest

from mmcl.data import build_train_loader


def take(loader, n):
    """The next `n` batches' keys of one loader (within and across epochs)."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(list(batch["keys"]))
            if len(out) == n:
                return out
    return out


def layout(kit, tokenizer, pattern, world, batch, workers, resampled=False):
    cfg = kit.data_config(pattern, num_workers=workers, shuffle_buffer=5, resampled=resampled,
                          samples_per_epoch=96 if resampled else None)
    return [build_train_loader(cfg, tokenizer, 8, batch_size=batch, seed=11, rank=r, world_size=world)
            for r in range(world)]


def interrupted(kit, tokenizer, pattern, steps, world=2, batch=4, workers=1):
    """Keys seen by each rank in `steps` steps, and every rank's saved state (JSON round trip)."""
    loaders = layout(kit, tokenizer, pattern, world, batch, workers)
    seen = [k for loader in loaders for batch_keys in take(loader, steps) for k in batch_keys]
    return seen, [json.loads(json.dumps(loader.state_dict())) for loader in loaders]


@pytest.mark.parametrize("world, batch, workers", [(1, 8, 1), (4, 2, 1), (4, 2, 2), (3, 2, 0)])
def test_interrupted_epoch_continues_on_another_layout_with_each_sample_once(tmp_path, kit, tokenizer, world,
                                                                            batch, workers):
    pattern, keys = kit.write_dataset(tmp_path, 4, 24)  # 96 samples: 12 global batches of 8 at 2 x 4
    before, states = interrupted(kit, tokenizer, pattern, steps=5)
    loaders = layout(kit, tokenizer, pattern, world, batch, workers)
    summaries = [loader.load_elastic_state(states) for loader in loaders]
    remaining = (96 - 40) // (batch * world)
    assert {s["remaining_batches"] for s in summaries} == {remaining}
    after = []
    for loader in loaders:
        epoch_keys = [k for batch in loader for k in batch["keys"]]  # the rest of epoch 0
        assert len(epoch_keys) == remaining * batch
        after += epoch_keys
        assert loader.epoch == 1
    seen = Counter(before + after)
    assert max(seen.values()) == 1
    assert len(seen) == world * batch * remaining + 40
    if (96 - 40) % (world * batch) == 0:  # else fewer than one global batch is left over, as in any epoch
        assert set(seen) == set(keys)
    # the next epoch is split the ordinary way over the new layout: every sample once again
    nxt = [k for loader in loaders for batch_keys in take(loader, 96 // (world * batch)) for k in batch_keys]
    assert len(set(nxt)) == len(nxt) == 96 // (world * batch) * world * batch


def test_a_second_interruption_on_a_third_layout_still_sees_each_sample_once(tmp_path, kit, tokenizer):
    pattern, keys = kit.write_dataset(tmp_path, 4, 24)
    first, states = interrupted(kit, tokenizer, pattern, steps=3)  # 2 ranks x 4: 24 samples
    middle = layout(kit, tokenizer, pattern, 4, 2, 2)
    for loader in middle:
        loader.load_elastic_state(states)
    second = [k for loader in middle for batch_keys in take(loader, 4) for k in batch_keys]  # 32 samples
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in middle]
    assert all(s["plan"]["history"] for s in saved)
    last = layout(kit, tokenizer, pattern, 1, 8, 1)[0]
    assert last.load_elastic_state(saved)["remaining_batches"] == 5
    third = [k for batch in last for k in batch["keys"]]
    everything = Counter(first + second + third)
    assert max(everything.values()) == 1 and set(everything) == set(keys)


def test_same_layout_resume_of_an_elastic_segment_is_exact(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 4, 24)
    _, states = interrupted(kit, tokenizer, pattern, steps=4)
    make = lambda: build_train_loader(kit.data_config(pattern, num_workers=2, shuffle_buffer=5), tokenizer, 8,  # noqa: E731
                                      batch_size=8, seed=11, rank=0, world_size=1)
    reference = make()
    reference.load_elastic_state(states)
    expected = take(reference, 6)
    first = make()
    first.load_elastic_state(states)
    head = take(first, 2)
    again = make()
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + take(again, 4) == expected


def test_resampled_stream_continues_deterministically_on_another_layout(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 4, 24)
    loaders = layout(kit, tokenizer, pattern, 2, 4, 1, resampled=True)
    for loader in loaders:
        take(loader, 5)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]

    def continued():
        new = layout(kit, tokenizer, pattern, 4, 2, 1, resampled=True)
        summaries = [loader.load_elastic_state(states) for loader in new]
        return summaries, [[k for batch in loader for k in batch["keys"]] for loader in new]

    summaries, once = continued()
    assert {s["remaining_batches"] for s in summaries} == {(96 - 40) // 8}
    assert continued()[1] == once  # the same checkpoint and layout give the same stream
    assert all(len(keys) == 7 * 2 for keys in once)


def test_elastic_state_refuses_another_seed(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 2, 8)
    _, states = interrupted(kit, tokenizer, pattern, steps=1)
    other = build_train_loader(kit.data_config(pattern), tokenizer, 8, batch_size=4, seed=12, rank=0, world_size=1)
    with pytest.raises(ValueError, match="seed was 11 and is now 12"):
        other.load_elastic_state(states)
