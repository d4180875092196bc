"""Training on a selection (`data.selection`): the loader delivers exactly the selected samples drawn
in each epoch, over real tiny shards, with every promise of the loader kept (exact and elastic
resume, equal steps per rank). Ranks are simulated in one process, as in test_elastic_resume.py;
tests/e2e/test_selection_launches.py runs the real launcher.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mmcl.config import load_config
from mmcl.data import NoDataError, build_train_loader
from mmcl.data.selection import SelectionError, _hash_strings, drawn, key_hash, read_selection
from mmcl.data.shards import derive_seed

SEED = 11
SHARDS, PER_SHARD = 4, 24  # 96 samples


def write_selection(path: Path, rows: list[tuple[str, float, str, int]], placed: bool = True) -> str:
    """rows: (key, probability, shard URL, index) -> the Parquet file `mmcl curate select` writes."""
    columns = {"key": pa.array([r[0] for r in rows], pa.string()),
               "probability": pa.array([r[1] for r in rows], pa.float64())}
    if placed:
        columns["shard"] = pa.array([r[2] for r in rows], pa.string())
        columns["index"] = pa.array([r[3] for r in rows], pa.int32())
    pq.write_table(pa.table(columns), path)
    return str(path)


def balanced_keys(candidates: list[str], per_class: int, seed: int = SEED) -> list[str]:
    """`4 * per_class` keys such that at p = 0.5 exactly half of them are drawn in epoch 0 and in
    epoch 1 (per_class of each (drawn in 0, drawn in 1) pattern): whole epochs then fill whole batches."""
    classes: dict[tuple[bool, bool], list[str]] = {}
    for key in candidates:
        classes.setdefault((drawn(seed, 0, key, 0.5), drawn(seed, 1, key, 0.5)), []).append(key)
    assert all(len(classes.get(c, [])) >= per_class for c in [(a, b) for a in (0, 1) for b in (0, 1)]), classes
    return [k for c in sorted(classes) for k in classes[c][:per_class]]


@pytest.fixture
def selected(tmp_path, kit):
    """96 samples: 48 selected whole (p = 1), 32 balanced (p = 0.5; 16 drawn per epoch), 16 not
    selected. 64 samples per epoch = 8 global batches of 2 ranks x 4."""
    pattern, keys = kit.write_dataset(tmp_path / "shards", SHARDS, PER_SHARD)
    whole = keys[::2]
    balanced = balanced_keys(keys[1::2], 8)
    rows = [(k, 1.0 if k in whole else 0.5, str(tmp_path / "shards" / f"{int(k[:3]):05d}.tar"), int(k[3:]))
            for k in keys if k in whole or k in balanced]
    probability = {r[0]: r[1] for r in rows}
    return pattern, keys, probability, rows, write_selection(tmp_path / "selection.parquet", rows)


def epoch_draw(probability: dict[str, float], epoch: int, seed: int = SEED) -> set[str]:
    return {k for k, p in probability.items() if drawn(seed, epoch, k, p)}


def loaders(kit, tokenizer, pattern, selection, world=2, batch=4, workers=2, **extra):
    cfg = kit.data_config(pattern, num_workers=workers, shuffle_buffer=5, selection=selection, **extra)
    return [build_train_loader(cfg, tokenizer, 8, batch_size=batch, seed=SEED, rank=r, world_size=world)
            for r in range(world)]


def take(loader, n):
    """The next `n` batches of one loader (within and across epochs)."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
    return out


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


# ---------------------------------------------------------------------------- the file and the draw


def test_drawn_is_the_contract_formula_and_always_true_at_probability_one():
    for key in ["000123", "a/b", "ü-key", ""]:
        for epoch in range(3):
            u = derive_seed(SEED, "selection", epoch, key) / 2**64
            for p in (0.1, 0.5, 0.9):
                assert drawn(SEED, epoch, key, p) == (u < p)
            assert drawn(SEED, epoch, key, 1.0)


def test_vectorised_key_hash_equals_the_per_key_hash():
    keys = ["", "a", "000000001", "ünïcödé", "x" * 300, "k/with/slashes", "000000001"]
    array = pa.array(["pad"] + keys, pa.string()).slice(1)  # a sliced array: offsets start mid-buffer
    assert _hash_strings(array).tolist() == [key_hash(k) for k in keys]
    assert _hash_strings(pa.array(keys, pa.large_string())).tolist() == [key_hash(k) for k in keys]


def test_the_lookup_gives_each_key_its_probability_and_zero_to_others(tmp_path):
    path = write_selection(tmp_path / "s.parquet", [("a", 1.0, "x.tar", 0), ("b", 0.25, "x.tar", 1),
                                                    ("c", 0.5, "y.tar", 0), ("a", 1.0, "y.tar", 3)])
    selection = read_selection(path)
    assert [selection.probability(k) for k in "abcd"] == [1.0, 0.25, 0.5, 0.0]
    assert selection.rows == 4 and selection.total == pytest.approx(2.75)
    assert len(selection.whole) == 1 and len(selection.partial) == 2  # "a", listed in two shards, is one entry
    members = selection.members(SEED, 0, ["y.tar", "x.tar", "z.tar"])
    assert members[0].tolist() == ([0] if drawn(SEED, 0, "c", 0.5) else []) + [3]
    assert members[1].tolist() == [0] + ([1] if drawn(SEED, 0, "b", 0.25) else [])
    assert members[2].tolist() == []


# ---------------------------------------------------------------------------- delivery


def test_only_the_drawn_selected_keys_are_delivered_each_once_per_epoch_on_two_ranks(kit, tokenizer, selected):
    pattern, keys, probability, _, selection = selected
    ranks = loaders(kit, tokenizer, pattern, selection)
    assert [r.steps_per_epoch for r in ranks] == [8, 8]  # 64 expected samples / (2 ranks x 4)
    for epoch in range(2):
        got = [k for loader in ranks for batch in loader for k in batch["keys"]]
        assert Counter(got) == Counter(epoch_draw(probability, epoch)), epoch
        assert all(loader.epoch == epoch + 1 for loader in ranks)
    assert all(loader.skip_counts() == {} and loader.repeated_samples() == 0 for loader in ranks)  # not bad data
    unselected = sum(loader.unselected_samples() for loader in ranks)
    assert 0 < unselected <= 2 * (96 - 64)  # read, but not delivered: not selected or not drawn


def test_balanced_keys_rotate_across_epochs_and_repeat_on_a_rerun(kit, tokenizer, selected):
    pattern, _, probability, _, selection = selected
    balanced = {k for k, p in probability.items() if p < 1}

    def two_epochs():
        ranks = loaders(kit, tokenizer, pattern, selection)
        return [[keys_of(loader) for loader in ranks] for _ in range(2)]

    first = two_epochs()
    delivered = [{k for rank in epoch for k in rank} & balanced for epoch in first]
    assert len(delivered[0]) == len(delivered[1]) == 16
    assert delivered[0] != delivered[1]  # head entries rotate
    assert two_epochs() == first  # the same seed draws the same samples, in the same batches


def test_an_unselected_bad_sample_is_neither_decoded_nor_counted_as_bad(tmp_path, kit, tokenizer):
    good = [kit.good_sample(f"k{i:03d}", i) for i in range(16)]
    broken = ("bad", {"jpg": b"not a jpeg", "txt": b"a photo"})
    kit.write_shard(tmp_path / "00000.tar", good[:8] + [broken] + good[8:])
    selection = write_selection(tmp_path / "s.parquet", [(k, 1.0, "", 0) for k, _ in good], placed=False)
    cfg = kit.data_config(str(tmp_path / "00000.tar"), selection=selection)
    loader = build_train_loader(cfg, tokenizer, 8, batch_size=4, seed=SEED, rank=0, world_size=1)
    assert loader.steps_per_epoch == 4
    assert sorted(keys_of(loader)) == [k for k, _ in good]
    assert loader.skip_counts() == {} and loader.unselected_samples() == 1


# ---------------------------------------------------------------------------- resume


def test_exact_resume_mid_epoch_equals_the_uninterrupted_run(kit, tokenizer, selected):
    pattern, _, _, _, selection = selected
    reference = [take(loader, 12) for loader in loaders(kit, tokenizer, pattern, selection)]  # into epoch 1
    first = loaders(kit, tokenizer, pattern, selection)
    heads = [take(loader, 3) for loader in first]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    again = loaders(kit, tokenizer, pattern, selection)
    for rank, loader in enumerate(again):
        loader.load_state_dict(states[rank])
        continued = heads[rank] + take(loader, 9)
        for expected, got in zip(reference[rank], continued):
            assert expected["keys"] == got["keys"]
            assert torch.equal(expected["pixel_values"], got["pixel_values"])
            assert torch.equal(expected["input_ids"], got["input_ids"])
    # the counters continue too: the resumed loaders count what the uninterrupted ones count
    whole = loaders(kit, tokenizer, pattern, selection)
    for loader in whole:
        take(loader, 12)
    assert [loader.unselected_samples() for loader in again] == [loader.unselected_samples() for loader in whole]


@pytest.mark.parametrize("world, batch, workers", [(3, 4, 1), (3, 4, 2), (1, 8, 1)])
def test_elastic_resume_from_2_ranks_covers_the_remaining_selected_keys_once(kit, tokenizer, selected, world,
                                                                            batch, workers):
    pattern, _, probability, _, selection = selected
    first = loaders(kit, tokenizer, pattern, selection)
    before = [k for loader in first for k in keys_of(take(loader, 2))]  # 16 of the epoch's 64
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    ranks = loaders(kit, tokenizer, pattern, selection, world=world, batch=batch, workers=workers)
    summaries = [loader.load_elastic_state(states) for loader in ranks]
    assert {s["remaining_batches"] for s in summaries} == {48 // (world * batch)}
    after = [k for loader in ranks for k in keys_of(loader)]  # the rest of epoch 0
    assert Counter(before + after) == Counter(epoch_draw(probability, 0))
    # the next epoch is split the ordinary way over the new layout: drawn keys only, none twice
    nxt = [k for loader in ranks for k in keys_of(loader)]
    assert max(Counter(nxt).values()) == 1 and set(nxt) <= epoch_draw(probability, 1)
    if 64 % (world * batch) == 0:
        assert set(nxt) == epoch_draw(probability, 1)


def test_a_second_elastic_resume_still_delivers_each_selected_key_once(kit, tokenizer, selected):
    pattern, _, probability, _, selection = selected
    first = loaders(kit, tokenizer, pattern, selection)
    one = [k for loader in first for k in keys_of(take(loader, 2))]  # 16
    middle = loaders(kit, tokenizer, pattern, selection, world=3, batch=4, workers=1)
    for loader in middle:
        loader.load_elastic_state([json.loads(json.dumps(loader.state_dict())) for loader in first])
    two = [k for loader in middle for k in keys_of(take(loader, 2))]  # 24
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in middle]
    last = loaders(kit, tokenizer, pattern, selection, world=1, batch=8, workers=2)[0]
    assert last.load_elastic_state(saved)["remaining_batches"] == 3
    three = keys_of(last)
    assert Counter(one + two + three) == Counter(epoch_draw(probability, 0))


# ---------------------------------------------------------------------------- other modes


def test_resampled_mode_filters_to_the_drawn_selected_keys(kit, tokenizer, selected):
    pattern, _, probability, _, selection = selected
    ranks = loaders(kit, tokenizer, pattern, selection, resampled=True, samples_per_epoch=64)
    for epoch in range(2):
        got = [k for loader in ranks for k in keys_of(loader)]
        assert len(got) == 64 and set(got) <= epoch_draw(probability, epoch)
    assert sum(loader.unselected_samples() for loader in ranks) > 0


def test_without_shard_and_index_the_epoch_length_still_comes_from_the_file(tmp_path, kit, tokenizer, selected):
    pattern, _, probability, rows, _ = selected
    selection = write_selection(tmp_path / "keys_only.parquet", rows, placed=False)
    (tmp_path / "shards" / "sizes.json").unlink()  # no sizes: the file alone sizes the epoch, even on 2 ranks
    ranks = loaders(kit, tokenizer, pattern, selection, workers=1)
    assert [r.steps_per_epoch for r in ranks] == [8, 8]
    got = [k for loader in ranks for k in keys_of(loader)]
    assert len(got) == 64 and set(got) <= epoch_draw(probability, 0)  # whole shards per rank: shares may differ
    one = loaders(kit, tokenizer, pattern, selection, world=1, batch=8, workers=0)[0]
    assert Counter(keys_of(one)) == Counter(epoch_draw(probability, 0))  # one consumer: exactly the draw


def test_a_selection_matching_no_sample_stops_with_a_message(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path / "shards", 1, 8)
    selection = write_selection(tmp_path / "s.parquet", [(f"other{i}", 1.0, "", 0) for i in range(8)], placed=False)
    loader = build_train_loader(kit.data_config(pattern, selection=selection), tokenizer, 8, batch_size=4, seed=SEED,
                                rank=0, world_size=1)
    with pytest.raises(NoDataError, match="8 samples read were not in data.selection"):
        take(loader, 1)


# ---------------------------------------------------------------------------- errors


def checked(tmp_path: Path, selection: str, kit):
    """The trainer's checks before any work (every rank runs them) on a run with `data.selection`."""
    from mmcl.engine.training_data import check_shards

    pattern, _ = kit.write_dataset(tmp_path / "shards", 1, 4)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"image": {"config": {"model_type": "vit", "hidden_size": 32}},
                  "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"}, "embed_dim": 64},
        "data": {"train_shards": pattern, "selection": selection}, "train": {"steps": 4},
        "output_dir": str(tmp_path / "run"),
    }))
    cfg = load_config(path)
    check_shards(cfg)
    return cfg


def table(**columns) -> pa.Table:
    return pa.table(columns)


BAD_FILES = {
    "missing": (None, "does not exist; point it at the Parquet file `mmcl curate select` wrote."),
    "not_parquet": (b"key,probability\na,1.0\n", "is not a Parquet file"),
    "no_probability": (table(key=["a"]), "has no column 'probability'; a selection needs 'key' and 'probability'"),
    "zero": (table(key=["a", "b"], probability=[1.0, 0.0]), "has probabilities outside (0, 1] (from 0.0 to 1.0)"),
    "above_one": (table(key=["a"], probability=[1.5]), "has probabilities outside (0, 1] (from 1.5 to 1.5)"),
    "null": (table(key=["a", "b"], probability=pa.array([0.5, None], pa.float64())), "has probabilities outside (0, 1]"),
    "shard_alone": (table(key=["a"], probability=[1.0], shard=["x.tar"]), "has a 'shard' column without its 'index'"),
    "empty": (table(key=pa.array([], pa.string()), probability=pa.array([], pa.float64())), "has no rows"),
    "string_probability": (table(key=["a"], probability=["1"]), "column 'probability' must be floats"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_selection_file_is_one_sentence_before_any_work(tmp_path, case, kit):
    content, message = BAD_FILES[case]
    path = tmp_path / "selection.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        pq.write_table(content, path)
    from mmcl.engine.runtime import TrainingError

    with pytest.raises(TrainingError) as caught:
        checked(tmp_path, str(path), kit)
    text = str(caught.value)
    assert f"data.selection '{path}'" in text and message in text
    assert text.count(". ") == 0 and "\n" not in text  # one sentence


def test_a_key_with_two_probabilities_is_refused(tmp_path):
    path = write_selection(tmp_path / "s.parquet", [("a", 1.0, "x.tar", 0), ("a", 0.5, "y.tar", 0)])
    with pytest.raises(SelectionError, match="gives key 'a' two different probabilities; keep one row per key."):
        read_selection(path)


def test_a_valid_selection_passes_the_config_check(tmp_path, kit):
    path = write_selection(tmp_path / "s.parquet", [("a", 1.0, "x.tar", 0), ("b", 0.5, "x.tar", 1)])
    assert checked(tmp_path, path, kit).data.selection == path
    assert np.isclose(read_selection(path).total, 1.5)


def test_resuming_with_another_selection_warns(tmp_path, kit, tokenizer, selected, caplog):
    pattern, _, _, rows, selection = selected
    first = loaders(kit, tokenizer, pattern, selection, world=1, batch=8, workers=1)[0]
    take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["selection"] == {"rows": 80, "expected": 64.0}
    same = loaders(kit, tokenizer, pattern, selection, world=1, batch=8, workers=1)[0]
    with caplog.at_level("WARNING", logger="mmcl.data.loader"):
        same.load_state_dict(state)
    assert "differs from the checkpoint" not in caplog.text
    other = write_selection(tmp_path / "other.parquet", rows[:-8])
    changed = loaders(kit, tokenizer, pattern, other, world=1, batch=8, workers=1)[0]
    with caplog.at_level("WARNING", logger="mmcl.data.loader"):
        changed.load_state_dict(state)
    assert "data.selection differs from the checkpoint's (saved {'rows': 80, 'expected': 64.0}, now {'rows': 72" in caplog.text
