"""The distill feature cache (`distill.cache_dir`) under the real `deepspeed` launcher with 2 CPU ranks,
over two epochs: an uninterrupted run, and the same run stopped by SIGTERM in its first epoch and
resumed with train.resume=latest. The resumed run's losses equal the uninterrupted run's step for
step; in both cache directories every sample's teacher features were encoded once (one entry per
sample key over all feature files, written by both ranks); every file is complete; and the cached
features are the teacher's own features of each sample's centre crop. Three launches, ~1 minute."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import deepspeed_command, kill_tree, latest_tag, losses, run, start, tiny_run_config, wait_for, write_config

SHARDS, PER_SHARD, MICRO = 8, 12, 4  # 96 samples: 12 steps per epoch at 2 ranks x 4
EPOCH_STEPS = SHARDS * PER_SHARD // (2 * MICRO)
STEPS = 2 * EPOCH_STEPS
DS_JSON = "configs/ds/zero2.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo digits in shards of 12 (the first 4 are the training data) and a transformers CLIP
    teacher at 24 px with its own normalisation, saved with the digits' tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("distill_cache")
    build_demo(out / "digits", image_size=16, samples_per_shard=PER_SHARD)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={"vocab_size": 300, "max_position_embeddings": 20, **tower},
                        vision_config={"image_size": 24, "patch_size": 8, **tower}, projection_dim=12)
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(out / "teacher")
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(out / "teacher")
    AutoTokenizer.from_pretrained(out / "digits" / "tokenizer").save_pretrained(out / "teacher")
    return out


def run_config(data: Path, name: str) -> Path:
    config = tiny_run_config(data / "digits", data / name / "run", micro_batch_size=MICRO, steps=STEPS,
                             checkpoint_every=0)
    config["data"]["train_shards"] = str(data / "digits" / "train" / f"{{00000..{SHARDS - 1:05d}}}.tar")
    config["objectives"] = {"clip": 1.0, "distill": 1.0}
    config["distill"] = {"teacher": str(data / "teacher"), "cache_dir": str(data / name / "cache")}
    return write_config(data / f"{name}.yaml", config)


@pytest.fixture(scope="module")
def runs(data):
    """(uninterrupted run, interrupted + resumed run, the step it was stopped at)."""
    reference = run_config(data, "reference")
    result = run(deepspeed_command(reference, DS_JSON))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    interrupted = run_config(data, "interrupted")
    out = data / "interrupted" / "run"
    process = start(deepspeed_command(interrupted, DS_JSON))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(),
             what="the first logged step")
    kill_tree(process, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert "stop requested: saved step" in output, output[-3000:]
    stopped_at = int(latest_tag(out).split("_")[1])
    assert 0 < stopped_at < EPOCH_STEPS, output[-3000:]  # in the first epoch: the resumed run encodes the rest
    result = run(deepspeed_command(interrupted, DS_JSON, 2, "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in result.stdout
    return data / "reference", data / "interrupted", stopped_at


def cache_entries(cache: Path) -> tuple[dict[str, list[tuple[str, torch.Tensor]]], list[str]]:
    """name ("image/<key>" or "text/<sha1>") -> every (writing rank, row) stored under it, over all
    feature files (features-r<rank>-<id>.safetensors); the directory's file names."""
    entries: dict[str, list[tuple[str, torch.Tensor]]] = {}
    files = sorted(p.name for p in cache.iterdir())
    for name in files:
        if name.startswith("features-"):
            for entry, row in load_file(cache / name).items():  # a partial file would not load
                entries.setdefault(entry, []).append((name.split("-")[1], row))
    return entries, files


def sample_keys(data: Path) -> set[str]:
    import tarfile

    keys = set()
    for shard in range(SHARDS):
        with tarfile.open(data / "digits" / "train" / f"{shard:05d}.tar") as tar:
            keys.update(name.split(".")[0] for name in tar.getnames())
    return keys


def test_resumed_distill_run_with_a_feature_cache_repeats_the_uninterrupted_losses(runs):
    reference, resumed, stopped_at = runs
    expected, got = losses(reference / "run"), losses(resumed / "run")
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, stopped_at, got, expected)
    for run in (reference, resumed):  # the teacher encoded every image of epoch 1, and none of epoch 2
        records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        encoded = {r["step"]: r["distill/encoded_images"] * 2 for r in records if "loss" in r}  # mean over 2 ranks
        assert [encoded[s] for s in range(1, STEPS + 1)] == [2 * MICRO] * EPOCH_STEPS + [0] * EPOCH_STEPS, run


@pytest.mark.parametrize("name", ["reference", "interrupted"])
def test_each_sample_s_teacher_features_were_encoded_once_by_the_two_ranks_into_complete_files(runs, data, name):
    entries, files = cache_entries(data / name / "cache")
    assert not [f for f in files if f.startswith(".")]  # no temporary file left behind
    assert {f.split("-")[1] for f in files if f.startswith("features-")} == {"r0", "r1"}  # both ranks wrote
    images = {entry[len("image/"):]: rows for entry, rows in entries.items() if entry.startswith("image/")}
    assert set(images) == sample_keys(data)  # every sample, once
    assert all(len(rows) == 1 for rows in images.values()), {k: len(v) for k, v in images.items() if len(v) > 1}
    # Captions repeat over samples: two ranks meeting one in the same step both encode it (same values);
    # never twice by one rank, never again after that step.
    texts = [rows for entry, rows in entries.items() if entry.startswith("text/")]
    assert texts and all(len({rank for rank, _ in rows}) == len(rows) for rows in texts)
    for rows in texts:
        torch.testing.assert_close(rows[0][1], rows[-1][1], atol=1e-5, rtol=0)


def test_cached_features_are_the_teacher_s_features_of_each_sample_s_centre_crop(runs, data):
    from mmcl.config import load_config
    from mmcl.engine import training_data
    from mmcl.objectives.teacher import load_teacher
    from mmcl.models import build_tokenizer

    cfg = load_config(str(data / "reference.yaml"))
    cfg.data.num_workers, cfg.data.shuffle_buffer = 0, 0
    teacher = load_teacher(cfg.distill)
    entries, _ = cache_entries(data / "reference" / "cache")
    resumed, _ = cache_entries(data / "interrupted" / "cache")
    checked = 0
    for batch in training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1, teacher=teacher.inputs()):
        fresh = teacher.encode_image(batch["teacher_pixel_values"])
        for key, row in zip(batch["keys"], fresh):
            torch.testing.assert_close(entries[f"image/{key}"][0][1], row, atol=1e-5, rtol=0)
            torch.testing.assert_close(resumed[f"image/{key}"][0][1], row, atol=1e-5, rtol=0)
            checked += 1
    assert checked == SHARDS * PER_SHARD
