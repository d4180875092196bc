from collections import Counter

import pytest
import torch

from mmcl.data import NoDataError, build_train_loader

EXPECTED_SKIPS = {
    "corrupt_image": 2,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_caption_encoding": 1,
    "image_too_large": 1,
    "missing_image": 1,
    "bad_label": 1,
    "truncated_shard": 1,
    "unreadable_shard": 1,
}
GOOD = ["g0", "g1", "g2", "g3", "t0", "t1"]


@pytest.fixture
def bad_corpus(tmp_path, kit):
    png = kit.image_bytes(50, fmt="PNG")
    samples = [kit.good_sample(f"g{i}", i) for i in range(4)] + [
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0" + b"\x13" * 300, "txt": b"a cat"}),
        ("truncpng", {"png": png[: len(png) // 2], "txt": b"a cat"}),
        ("nocaption", {"jpg": kit.image_bytes(51)}),
        ("empty", {"jpg": kit.image_bytes(52), "txt": b"  \n "}),
        ("notutf8", {"jpg": kit.image_bytes(53), "txt": b"a \xff\xfe cat"}),
        ("big", {"jpg": kit.image_bytes(54, size=(64, 64)), "txt": b"a big cat"}),
        ("noimage", {"txt": b"a cat", "json": b"{}"}),
        ("badlabel", {"jpg": kit.image_bytes(55), "txt": b"a cat", "cls": b"seven"}),
    ]
    kit.write_shard(tmp_path / "00000.tar", samples)
    truncated = kit.write_shard(tmp_path / "00001.tar", [kit.good_sample(f"t{i}", 100 + i) for i in range(3)])
    data = truncated.read_bytes()
    cut = data.index(b"t2.jpg") + 512 + 100  # inside t2's image bytes
    truncated.write_bytes(data[:cut])
    # 00002.tar is missing on purpose.
    return f"{tmp_path}/{{00000..00002}}.tar"


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 2)])
def test_bad_samples_are_skipped_and_counted_exactly(bad_corpus, kit, tokenizer, world_size, num_workers):
    cfg = kit.data_config(bad_corpus, num_workers=num_workers, max_pixels=40 * 32)
    keys, skips = [], Counter()
    for rank in range(world_size):
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, rank=rank, world_size=world_size, exhaust=True)
        keys += [k for batch in loader for k in batch["keys"]]
        skips.update(loader.skip_counts())
    assert sorted(keys) == GOOD
    assert dict(skips) == EXPECTED_SKIPS


def test_counts_stay_exact_across_a_resume(bad_corpus, kit, tokenizer):
    cfg = kit.data_config(bad_corpus, num_workers=2, max_pixels=40 * 32, shuffle_buffer=2)
    make = lambda: build_train_loader(cfg, tokenizer, 8, batch_size=1, seed=0, exhaust=True)
    for cut in range(1, len(GOOD)):
        first = make()
        head = []
        for batch in first:
            head += batch["keys"]
            if len(head) == cut:
                break
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        tail = [k for batch in resumed for k in batch["keys"]]
        assert sorted(head + tail) == GOOD
        assert resumed.skip_counts() == EXPECTED_SKIPS


def test_a_pipeline_that_yields_nothing_stops_with_a_message(tmp_path, kit, tokenizer):
    kit.write_shard(tmp_path / "0.tar", [(f"k{i}", {"jpg": b"\xff\xd8 broken", "txt": b"a cat"}) for i in range(5)])
    for resampled in (False, True):
        cfg = kit.data_config(str(tmp_path / "0.tar"), resampled=resampled, samples_per_epoch=4)
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0)
        with pytest.raises(NoDataError, match="corrupt_image"):
            list(loader)


def test_short_worker_tops_up_with_repeats_to_keep_equal_steps(tmp_path, kit, tokenizer):
    # sizes.json promises 8 samples per shard, but shard 1 is missing: quotas are met with repeats.
    pattern, _ = kit.write_dataset(tmp_path, 2, 8)
    (tmp_path / "00001.tar").unlink()
    loader = build_train_loader(kit.data_config(pattern, num_workers=2), tokenizer, 8, batch_size=2, seed=0)
    batches = list(loader)
    assert loader.steps_per_epoch == 8 and len(batches) == 8
    keys = Counter(k for b in batches for k in b["keys"])
    assert set(keys) == {f"000{i:04d}" for i in range(8)} and sum(keys.values()) == 16
    assert loader.repeated_samples() == 8 and loader.skip_counts() == {"unreadable_shard": 1}


def test_a_failing_transform_skips_the_sample_and_counts_it(tmp_path, kit, tokenizer):
    kit.write_shard(tmp_path / "0.tar", [kit.good_sample(f"k{i}", i) for i in range(6)]
                    + [("wide", {"jpg": kit.image_bytes(9, size=(80, 20)), "txt": b"a wide cat"})])

    def square_only(image):
        if image.shape[1] * 2 < image.shape[2]:
            raise ValueError("too wide")
        return image[:, :16, :16]

    cfg = kit.data_config(str(tmp_path / "0.tar"))
    loader = build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, image_transform=square_only, exhaust=True)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == [f"k{i}" for i in range(6)]
    assert loader.skip_counts() == {"transform_error": 1}


NESTED = b"[" * 5000 + b"]" * 5000


@pytest.fixture
def malformed_shard(tmp_path, kit):
    """4 good samples and one of each malformed caption or label, in one real shard."""
    samples = [kit.good_sample(f"g{i}", i) for i in range(4)] + [
        ("nested", {"jpg": kit.image_bytes(60), "txt": NESTED}),
        ("nestedlist", {"jpg": kit.image_bytes(61), "txt": b'["a cat", ' + NESTED + b"]"}),
        ("hugeint", {"jpg": kit.image_bytes(62), "txt": b"[" + b"9" * 5000 + b"]"}),
        ("long", {"jpg": kit.image_bytes(63), "txt": b"a cat " * 2500}),  # 15000 bytes > max_text_bytes
        ("biglabel", {"jpg": kit.image_bytes(64), "txt": b"a cat", "cls": b"9" * 40}),
        ("neglabel", {"jpg": kit.image_bytes(65), "txt": b"a cat", "cls": b"-3"}),
        ("bigimage", {"jpg": kit.image_bytes(66) + bytes(5000), "txt": b"a cat"}),  # > max_image_bytes
    ]
    return str(kit.write_shard(tmp_path / "0.tar", samples))


MALFORMED_SKIPS = {"bad_caption": 3, "caption_too_large": 1, "bad_label": 2, "image_too_large": 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_malformed_captions_labels_and_oversized_members_are_skipped_and_counted(malformed_shard, kit, tokenizer,
                                                                                 num_workers):
    cfg = kit.data_config(malformed_shard, num_workers=num_workers, max_text_bytes=12_000, max_image_bytes=4096)
    loader = build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, exhaust=True)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == ["g0", "g1", "g2", "g3"]
    assert loader.skip_counts() == MALFORMED_SKIPS


def test_malformed_samples_are_counted_alike_by_both_evaluation_loaders(malformed_shard, tokenizer):
    from mmcl.data import build_eval_loader as shard_eval_loader
    from mmcl.evaluation.data import build_eval_loader

    loader = shard_eval_loader(malformed_shard, tokenizer, 8, batch_size=3, image_size=16, num_workers=2,
                               max_text_bytes=12_000, max_image_bytes=4096)
    assert sorted(k for batch in loader for k in batch["keys"]) == ["g0", "g1", "g2", "g3"]
    assert loader.skip_counts() == MALFORMED_SKIPS
    # the evaluation command's loader reads with the default limits: "long" and "bigimage" are fine there
    evaluation = build_eval_loader(malformed_shard, lambda image: torch.zeros(3, 4, 4), batch_size=3)
    assert sum(len(batch["index"]) for batch in evaluation) == 6
    assert dict(evaluation.skipped) == {"bad_caption": 3, "bad_label": 2}
