"""Training on a selection end to end: the real `deepspeed` launcher, CPU gloo ranks, ZeRO-2.

One run with `data.selection` on 2 ranks is stopped mid-epoch 0 (SIGTERM after its first
checkpoint) and resumed on 1 rank with the same global batch (as `python train.py`: one rank
needs no launcher); it trains 2 epochs in all. Every launch logs each step's sample keys per rank
(MMCL_DEBUG_DIR, as test_elastic_resume_launches.py reads them). The checks: each epoch trained
exactly the selected samples drawn in it, each once; the balanced ones differ between the epochs;
and a rerun of the loader alone draws the same ones.
"""
from __future__ import annotations

import json
import signal
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import (deepspeed_command, kill_tree, latest_tag, python_command, resume_copy, run, start, tiny_run_config,
                    wait_for, write_config)

pytestmark = pytest.mark.e2e

SHARDS, PER_SHARD, GLOBAL_BATCH, SEED = 8, 24, 16, 0
# 192 samples: 96 selected whole (p = 1), 32 balanced (p = 0.5, 16 drawn per epoch), 64 not selected:
# 112 samples per epoch = 7 global batches of 16
EPOCH_STEPS, EPOCHS = 7, 2


def balanced_keys(candidates: list[str], per_class: int, seed: int) -> list[str]:
    """`4 * per_class` keys of which, at p = 0.5, exactly half are drawn in epoch 0 and in epoch 1
    (per_class of each (drawn in 0, drawn in 1) pattern), so whole epochs fill whole batches."""
    from mmcl.data.selection import drawn

    classes: dict[tuple[bool, bool], list[str]] = {}
    for key in candidates:
        classes.setdefault((drawn(seed, 0, key, 0.5), drawn(seed, 1, key, 0.5)), []).append(key)
    return [k for c in sorted(classes) for k in classes[c][:per_class]]


def shard_keys(data: Path) -> list[tuple[str, str, int]]:
    """(key, shard path, index in the shard) of every sample of the first SHARDS shards, in order."""
    out = []
    for s in range(SHARDS):
        shard = data / "train" / f"{s:05d}.tar"
        with tarfile.open(shard) as tar:
            keys = list(dict.fromkeys(name.split(".")[0] for name in tar.getnames()))
        out += [(key, str(shard), index) for index, key in enumerate(keys)]
    return out


def logged(debug_dir: Path) -> dict[int, list[str]]:
    """step -> the keys every rank of one launch trained on in it."""
    steps: dict[int, list[str]] = {}
    for path in sorted(debug_dir.glob("keys_rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return steps


@pytest.fixture(scope="module")
def selection_runs(tmp_path_factory):
    """The stopped 2-rank run and its 1-rank resume, with the selection they trained on."""
    from data_tools.demo_dataset import build_demo

    from mmcl.data.selection import drawn

    data = tmp_path_factory.mktemp("digits24")
    build_demo(data, image_size=16, samples_per_shard=PER_SHARD)
    samples = shard_keys(data)
    keys = [k for k, _, _ in samples]
    whole = set(keys[::2])
    balanced = set(balanced_keys(keys[1::2], 8, seed=SEED))
    rows = [(k, 1.0 if k in whole else 0.5, shard, index) for k, shard, index in samples if k in whole | balanced]
    base = tmp_path_factory.mktemp("selection")
    selection = base / "selection.parquet"
    pq.write_table(pa.table({"key": [r[0] for r in rows], "probability": pa.array([r[1] for r in rows], pa.float64()),
                             "shard": [r[2] for r in rows], "index": pa.array([r[3] for r in rows], pa.int32())}),
                   selection)
    config = tiny_run_config(data, base / "run", micro_batch_size=GLOBAL_BATCH // 2, steps=EPOCH_STEPS * EPOCHS,
                             checkpoint_every=2, keep_checkpoints=10)
    config["data"]["train_shards"] = str(data / "train" / f"{{00000..{SHARDS - 1:05d}}}.tar")
    config["data"]["selection"] = str(selection)
    config["seed"] = SEED
    config_path = write_config(base / "run.yaml", config)
    first = base / "run"
    process = start(deepspeed_command(config_path, "configs/ds/zero2.json", 2),
                    extra_env={"MMCL_DEBUG_DIR": str(base / "debug0")})
    wait_for(lambda: latest_tag(first) is not None, timeout=1500, what="first checkpoint")
    kill_tree(process, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    tag = latest_tag(first)
    stopped_at = int(tag.split("_")[1])
    assert 2 <= stopped_at < EPOCH_STEPS, f"not stopped mid-epoch 0 (at {tag}): {output[-2000:]}"
    assert "stop requested: saved step" in output, output[-3000:]
    target = resume_copy(first, base / "resumed", tag)
    resumed = run(python_command(config_path, "configs/ds/zero2.json", f"output_dir={target}",
                                 "train.resume=latest", f"train.micro_batch_size={GLOBAL_BATCH}"),
                  timeout=1500, extra_env={"MMCL_DEBUG_DIR": str(base / "debug1")})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    probability = {r[0]: r[1] for r in rows}
    draws = [{k for k, p in probability.items() if drawn(SEED, e, k, p)} for e in range(EPOCHS)]
    return {"config": config, "output": output, "resumed": resumed, "stopped_at": stopped_at, "target": target,
            "before": {s: k for s, k in logged(base / "debug0").items() if s <= stopped_at},
            "after": logged(base / "debug1"), "keys": keys, "probability": probability, "draws": draws,
            "balanced": balanced}


def epoch_of(step: int) -> int:
    return (step - 1) // EPOCH_STEPS


def test_each_epoch_trains_exactly_the_drawn_selected_keys_once_across_world_sizes(selection_runs):
    runs = selection_runs
    assert "data.selection" in runs["output"] and f"{EPOCH_STEPS} steps per epoch" in runs["output"]
    assert "elastic resume from" in runs["resumed"].stdout and "world size 2 -> 1" in runs["resumed"].stdout
    steps = {**runs["before"], **runs["after"]}
    assert sorted(steps) == list(range(1, EPOCH_STEPS * EPOCHS + 1))
    assert set(runs["after"]) == set(range(runs["stopped_at"] + 1, EPOCH_STEPS * EPOCHS + 1))  # the resume's steps
    assert all(len(keys) == GLOBAL_BATCH for keys in steps.values())
    selected = set(runs["probability"])
    assert len(selected) == 128 and len(runs["keys"]) == 192
    print(f"selection: {len(runs['keys'])} samples in {SHARDS} shards, {len(selected)} selected "
          f"({len(selected) - len(runs['balanced'])} at p = 1, {len(runs['balanced'])} at p = 0.5)")
    for epoch in range(EPOCHS):
        trained = Counter(k for step, keys in steps.items() if epoch_of(step) == epoch for k in keys)
        assert set(trained) <= selected
        assert trained == Counter(runs["draws"][epoch]), epoch  # exactly the epoch's draw, each once
        assert len(trained) == EPOCH_STEPS * GLOBAL_BATCH
        on_two = sum(1 for step, keys in runs["before"].items() if epoch_of(step) == epoch for _ in keys)
        print(f"epoch {epoch}: {len(trained)} distinct keys trained, {sum(trained.values())} samples "
              f"({on_two} on 2 ranks before the stop at step {runs['stopped_at']}, the rest on 1 rank), "
              f"{len(set(trained) & runs['balanced'])} of the 32 balanced, all {len(trained)} in the epoch's draw")


def test_balanced_entries_differ_between_epochs_and_repeat_on_a_rerun(selection_runs, tmp_path):
    from mmcl.config import DataConfig
    from mmcl.data import build_train_loader

    runs = selection_runs
    steps = {**runs["before"], **runs["after"]}
    trained = [{k for step, keys in steps.items() if epoch_of(step) == e for k in keys} & runs["balanced"]
               for e in range(EPOCHS)]
    assert len(trained[0]) == len(trained[1]) == 16 and trained[0] != trained[1]
    # a rerun with the same seed, here the loader alone on one rank: the same samples each epoch
    data = runs["config"]["data"]
    cfg = DataConfig(train_shards=data["train_shards"], selection=data["selection"], image_size=16,
                     shuffle_buffer=data["shuffle_buffer"], num_workers=0)
    loader = build_train_loader(cfg, None, batch_size=GLOBAL_BATCH, seed=SEED, rank=0, world_size=1)
    assert loader.steps_per_epoch == EPOCH_STEPS
    for epoch in range(EPOCHS):
        rerun = [k for batch in loader for k in batch["keys"]]
        assert set(rerun) & runs["balanced"] == trained[epoch]


def test_unselected_samples_are_reported_apart_from_bad_data(selection_runs):
    metrics = json.loads((selection_runs["target"] / "metrics.json").read_text())
    assert metrics["skipped"] == {}
    assert metrics["unselected"] > 0  # read, not delivered: not selected, or not drawn in the epoch
    assert metrics["steps"] == EPOCH_STEPS * EPOCHS
