import json

import pytest
import torch

from mmcl.data import build_train_loader


def take(loader, n):
    """The next `n` batches, crossing epochs the way a trainer does."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_same_batches(tmp_path, kit, tokenizer, resampled, num_workers):
    pattern, _ = kit.write_dataset(tmp_path, 3, 9)  # 27 samples
    cfg = kit.data_config(pattern, resampled=resampled, samples_per_epoch=24, num_workers=num_workers,
                          shuffle_buffer=5)
    make = lambda: build_train_loader(cfg, tokenizer, 8, batch_size=3, seed=7)
    steps = make().steps_per_epoch
    reference = take(make(), 3 * steps)
    # Cut mid-epoch, exactly at an epoch end, and so that the resumed run crosses an epoch boundary.
    for cut in (steps // 2 + 1, steps, steps + steps // 2):
        first = make()
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
        resumed = make()
        resumed.load_state_dict(state)
        tail = take(resumed, 3 * steps - cut)
        assert_same(head + tail, reference)
        assert resumed.epoch == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_exhaust_mode_with_bad_samples_keeps_counts(tmp_path, kit, tokenizer, num_workers):
    samples = [kit.good_sample(f"k{i:02d}", i) for i in range(14)]
    for i in (2, 5, 11):  # missing captions, spread over workers' streams
        samples[i][1].pop("txt")
    kit.write_shard(tmp_path / "0.tar", samples[:7])
    kit.write_shard(tmp_path / "1.tar", samples[7:])
    cfg = kit.data_config(f"{tmp_path}/{{0..1}}.tar", num_workers=num_workers, shuffle_buffer=3)
    make = lambda: build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=3, exhaust=True)
    reference = make()
    expected = take(reference, 12)
    total = reference.skip_counts()
    assert total == {"missing_caption": 6}  # two epochs
    for cut in (1, 3, 6, 8):
        first = make()
        head = take(first, cut)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert resumed.skip_counts() == first.skip_counts()
        assert_same(head + take(resumed, 12 - cut), expected)
        assert resumed.skip_counts() == total


def test_resume_refuses_a_different_layout(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 2, 6)
    saved = build_train_loader(kit.data_config(pattern), tokenizer, 8, batch_size=2, seed=0)
    take(saved, 2)
    other = build_train_loader(kit.data_config(pattern, num_workers=2), tokenizer, 8, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="num_workers: saved 1, now 2"):
        other.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict(), strict=False)
    assert other.epoch == 1 and other.state_dict()["batches_in_epoch"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_leaves_the_trainers_rng_untouched(tmp_path, kit, tokenizer, num_workers):
    import random

    pattern, _ = kit.write_dataset(tmp_path, 2, 6)
    loader = build_train_loader(kit.data_config(pattern, num_workers=num_workers), tokenizer, 8, batch_size=3, seed=0)
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    assert len(take(loader, 5)) == 5
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
