"""Distilling from a reinforced store (`distill.store`) under the real `deepspeed` launcher with 2 CPU
ranks, ZeRO-2 and feature-cache accumulation, over two epochs: no teacher is loaded or run (the
teacher encoded no image, the checkpoint holds the store's fingerprint only), the loss is clip plus
the stored teachers' distillation term, and the run resumed from its step-4 checkpoint repeats the
uninterrupted losses. Two launches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import (assert_resumed_run_matches, deepspeed_command, losses, resume_copy, run, tiny_run_config,
                    write_config)
from reinforced_store import build_store

PER_SHARD, MICRO, ACCUMULATE = 12, 4, 2  # 48 samples: 3 optimizer steps per epoch at 2 ranks x 4 x 2
STEPS = 6
DS_JSON = "configs/ds/zero2.json"


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory):
    """Demo digits in shards of 12, a tiny transformers CLIP teacher at 24 px, and its store of the
    first 4 shards with 3 augmentations per sample."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("distill_store")
    build_demo(out / "digits", image_size=16, samples_per_shard=PER_SHARD)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={"vocab_size": 300, "max_position_embeddings": 20, **tower},
                        vision_config={"image_size": 24, "patch_size": 8, **tower}, projection_dim=12)
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(out / "teacher")
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(out / "teacher")
    AutoTokenizer.from_pretrained(out / "digits" / "tokenizer").save_pretrained(out / "teacher")
    shards = str(out / "digits" / "train" / "{00000..00003}.tar")
    build_store(out / "store", shards, [out / "teacher"], augmentations=3, seed=1, crop_scale=(0.5, 1.0))
    return out, shards


@pytest.fixture(scope="module")
def store_run(reinforced):
    out, shards = reinforced
    config = tiny_run_config(out / "digits", out / "run", micro_batch_size=MICRO, grad_accum_steps=ACCUMULATE,
                             steps=STEPS, checkpoint_every=4, keep_checkpoints=3)
    config["data"]["train_shards"] = shards
    config["objectives"] = {"clip": 1.0, "distill": 1.0}
    config["distill"] = {"store": str(out / "store")}
    path = write_config(out / "run.yaml", config)
    result = run(deepspeed_command(path, DS_JSON))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, out / "run", out / "store"


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_distill_from_a_store_trains_beside_clip_without_any_teacher(store_run):
    from mmcl.data.reinforced import read_manifest, store_fingerprint

    _, out, store = store_run
    logged = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    for r in logged:
        assert r["loss"] == pytest.approx(r["clip"] + r["distill"], rel=1e-5)
        assert r["distill"] > 0 and 0 <= r["distill/i2t_agree"] <= 1
        assert r["distill/encoded_images"] == 0  # no teacher forward, ever
    state = load_file(out / "checkpoints" / f"step_{STEPS:08d}" / "task_state.safetensors")
    assert list(state) == ["distill.store_sha256"]  # no teacher fingerprint: none was loaded
    assert bytes(state["distill.store_sha256"].tolist()).hex() == store_fingerprint(read_manifest(store))


def test_distill_from_a_store_resumes_with_the_same_losses(store_run, tmp_path):
    config, out, _ = store_run
    resumed = resume_copy(out, tmp_path / "resumed")
    result = run(deepspeed_command(config, DS_JSON, 2, f"output_dir={resumed}", "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_resumed_run_matches(out, resumed, [5, 6])
    assert losses(resumed) == {step: losses(out)[step] for step in (5, 6)}  # bit-equal, not only close
