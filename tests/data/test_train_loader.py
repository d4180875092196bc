import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from mmcl.data import CLIP_MEAN, CLIP_STD, NoDataError, NoShardsError, build_eval_loader, build_train_loader
from mmcl.data.transforms import ResizeCenterCropU8


def all_batches(loader):
    return [batch for batch in loader]


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def solid_png(color, size=(24, 20)):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")  # lossless: exact pixel values
    return out.getvalue()


def test_reads_img2dataset_shards(tmp_path, kit, tokenizer):
    samples = [
        ("k0", {"png": solid_png((255, 0, 0)), "txt": b"a red car", "json": b"{}", "cls": b"3"}),
        ("k1", {"png": solid_png((0, 0, 255)), "txt": b"the blue tree", "json": b"{}", "cls": b"5"}),
        ("k2", {"png": solid_png((0, 0, 0)), "txt": '["a cat", "a dog"]'.encode(), "json": b"{}", "cls": b"0"}),
    ]
    kit.write_shard(tmp_path / "00000.tar", samples)
    loader = build_eval_loader(str(tmp_path / "00000.tar"), tokenizer, 5, batch_size=8, image_size=16)
    (batch,) = all_batches(loader)
    assert batch["keys"] == ["k0", "k1", "k2"]
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    expected_red = torch.tensor([(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]])
    assert torch.allclose(batch["pixel_values"][0].mean(dim=(1, 2)), expected_red, atol=1e-5)
    assert batch["labels"].tolist() == [3, 5, 0]
    ids = lambda *w: [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(list(w)), tokenizer.sep_token_id]
    assert batch["input_ids"].tolist()[0] == ids("a", "red", "car")
    assert batch["input_ids"].tolist()[2] == ids("a", "cat") + [0]  # first caption in evaluation
    assert batch["attention_mask"].tolist()[2] == [1, 1, 1, 1, 0]
    assert batch["captions"] == [["a red car"], ["the blue tree"], ["a cat", "a dog"]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_train_batches_have_fixed_shapes_and_pipe_urls_work(tmp_path, kit, tokenizer):
    pattern, keys = kit.write_dataset(tmp_path, 2, 10)
    cfg = kit.data_config(f"pipe:cat {tmp_path}/00000.tar::{tmp_path}/00001.tar", samples_per_epoch=20)
    loader = build_train_loader(cfg, tokenizer, 7, batch_size=4, seed=0)
    assert loader.steps_per_epoch == 5
    batches = all_batches(loader)
    assert len(batches) == 5 and loader.epoch == 1
    assert sorted(keys_of(batches)) == sorted(keys)
    for b in batches:
        assert b["pixel_values"].shape == (4, 3, 16, 16) and b["input_ids"].shape == b["attention_mask"].shape == (4, 7)
        assert "labels" not in b


def test_caption_lists_pick_one_caption_per_epoch_deterministically(tmp_path, kit, tokenizer):
    captions = ["a cat", "a dog", "a car", "a tree", "the sample"]
    kit.write_shard(tmp_path / "0.tar", [(f"k{i}", {"jpg": kit.image_bytes(i), "txt": json.dumps(captions).encode()})
                                         for i in range(20)])
    cfg = kit.data_config(str(tmp_path / "0.tar"))
    chosen = []
    for _ in range(2):
        loader = build_train_loader(cfg, tokenizer, 4, batch_size=20, seed=0)
        per_epoch = [tuple(b["input_ids"][:, 2].tolist()) for b in (all_batches(loader) + all_batches(loader))]
        chosen.append(per_epoch)
    assert chosen[0] == chosen[1]  # deterministic
    assert chosen[0][0] != chosen[0][1]  # differs between epochs
    assert len(set(chosen[0][0])) > 2  # several captions used


@pytest.mark.parametrize("num_shards", [1, 3, 8])
@pytest.mark.parametrize("sizes", [True, False])
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, kit, tokenizer, num_shards, sizes):
    pattern, keys = kit.write_dataset(tmp_path, num_shards, 24 // num_shards + 1, sizes=sizes)
    cfg = kit.data_config(pattern, num_workers=2, shuffle_buffer=4)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=3, seed=1, rank=rank, world_size=2, exhaust=True)
        seen += keys_of(all_batches(loader))
    assert Counter(seen) == Counter(keys)


def test_equal_steps_per_rank_with_full_batches(tmp_path, kit, tokenizer):
    pattern, keys = kit.write_dataset(tmp_path, 3, 11)  # 33 samples, 4 consumers
    cfg = kit.data_config(pattern, num_workers=2)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=4, seed=0, rank=rank, world_size=2)
        batches = all_batches(loader)
        assert loader.steps_per_epoch == 4 and len(batches) == 4
        assert all(b["pixel_values"].shape[0] == 4 for b in batches)
        per_rank.append(keys_of(batches))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert loader.repeated_samples() == 0


def test_epoch_mode_without_sizes_needs_a_count_on_several_ranks(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 2, 5, sizes=False)
    with pytest.raises(ValueError, match="sizes.json"):
        build_train_loader(kit.data_config(pattern), tokenizer, 8, batch_size=2, rank=0, world_size=2)
    single = build_train_loader(kit.data_config(pattern), tokenizer, 8, batch_size=3)
    assert single.steps_per_epoch is None
    assert [len(b["keys"]) for b in all_batches(single)] == [3, 3, 3]  # partial batch dropped


def test_same_seed_same_order_different_seed_different_order(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 4, 8)
    for resampled in (False, True):
        cfg = kit.data_config(pattern, resampled=resampled, samples_per_epoch=32)
        runs = {}
        for seed in (0, 0, 1):
            loader = build_train_loader(cfg, tokenizer, 8, batch_size=4, seed=seed)
            batches = all_batches(loader) + all_batches(loader)
            runs.setdefault(seed, []).append(batches)
        a, b = runs[0]
        assert keys_of(a) == keys_of(b)
        assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
        assert keys_of(runs[1][0]) != keys_of(a)
        assert keys_of(a[:8]) != keys_of(a[8:])  # epochs differ in order


def test_resampled_weights_mix_sources(tmp_path, kit, tokenizer):
    kit.write_dataset(tmp_path / "a", 2, 10, prefix="a")
    kit.write_dataset(tmp_path / "b", 2, 10, prefix="b")
    pattern = f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b/{{00000..00001}}.tar"
    drawn = {}
    for weights in ([1.0, 0.0], [1.0, 3.0]):
        cfg = kit.data_config(pattern, resampled=True, samples_per_epoch=400, train_weights=weights)
        loader = build_train_loader(cfg, tokenizer, 8, batch_size=20, seed=0)
        batches = all_batches(loader)
        assert len(batches) == 20
        drawn[weights[1]] = Counter(k[0] for k in keys_of(batches))
    assert drawn[0.0] == {"a": 400}
    assert 0.6 < drawn[3.0]["b"] / 400 < 0.9  # 3:1 per source (whole shards are drawn, so it is noisy)


def test_two_views_and_image_only(tmp_path, kit, tokenizer):
    kit.write_shard(tmp_path / "0.tar", [(f"k{i}", {"jpg": kit.image_bytes(i)}) for i in range(6)])
    cfg = kit.data_config(str(tmp_path / "0.tar"), samples_per_epoch=6)
    views = (ResizeCenterCropU8(16), lambda image: torch.zeros(3, 16, 16))
    loader = build_train_loader(cfg, None, batch_size=3, seed=0, view_transforms=views)
    batches = all_batches(loader)
    assert len(batches) == 2 and loader.skip_counts() == {}
    for b in batches:
        assert set(b) == {"keys", "pixel_values", "views"}
        assert [v.shape for v in b["views"]] == [(3, 3, 16, 16), (3, 3, 16, 16)]
        assert torch.equal(b["views"][1], torch.zeros(3, 3, 16, 16))
    # With a tokenizer the same shard has no captions: all skipped -> a clear error.
    with pytest.raises(NoDataError, match="missing_caption"):
        all_batches(build_train_loader(cfg, tokenizer, 8, batch_size=3, seed=0))


def test_two_views_are_augmented_independently(tmp_path, kit):
    kit.write_shard(tmp_path / "0.tar", [(f"k{i}", {"jpg": kit.image_bytes(i, size=(64, 48))}) for i in range(4)])
    cfg = kit.data_config(str(tmp_path / "0.tar"), samples_per_epoch=4, train_crop_scale=[0.1, 0.3])
    from mmcl.data import clip_train_transform

    views = (clip_train_transform(16, (0.1, 0.3)), clip_train_transform(16, (0.1, 0.3)))
    (batch,) = all_batches(build_train_loader(cfg, None, batch_size=4, seed=0, view_transforms=views, pixel_values=False))
    assert "pixel_values" not in batch
    assert not torch.equal(batch["views"][0], batch["views"][1])


def test_no_shards_is_a_clear_error(tmp_path, kit, tokenizer):
    with pytest.raises(NoShardsError, match="nothing-"):
        build_train_loader(kit.data_config(f"{tmp_path}/nothing-{{0..3}}.tar"), tokenizer, batch_size=2)


def test_eval_loader_splits_across_ranks_in_order(tmp_path, kit, tokenizer):
    pattern, keys = kit.write_dataset(tmp_path, 3, 5, labels=True)
    seen = []
    for rank in range(2):
        loader = build_eval_loader(pattern, None, batch_size=4, image_size=16, rank=rank, world_size=2, num_workers=2)
        for _ in range(2):  # re-iterable, same result
            batches = all_batches(loader)
        seen += keys_of(batches)
        assert all("input_ids" not in b and b["labels"].shape[0] == len(b["keys"]) for b in batches)
    assert sorted(seen) == keys and len(seen) == len(keys)
