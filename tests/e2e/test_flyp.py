"""FLYP end to end: 2 CPU ranks under the deepspeed launcher (ZeRO-2) fine-tune on the labelled
digits with class-prompt captions (data.captions_from_labels), evaluate zero-shot, and resume.

One reference launch (6 steps of 2 feature-cached micro-batches, a checkpoint at step 3) and
one launch resumed from that checkpoint. The labels travel with the batch and are all-gathered: every step's logged count
of left-out same-class pairs equals the one computed here from the step's sample keys (both
ranks') and the shards' .cls files. The class prompts are drawn per (seed, epoch, key), so the
resumed run logs the reference's losses and ends with its zero-shot accuracy.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest
from launch import deepspeed_command, losses, resume_copy, run, tiny_run_config, write_config

STEPS, RESUME_AT = 6, 3


def flyp_config(digits, output_dir):
    # 2 micro-batches of 8 per step: the labels also travel through feature-cache accumulation.
    config = tiny_run_config(digits, output_dir, steps=STEPS, checkpoint_every=RESUME_AT, micro_batch_size=8,
                             grad_accum_steps=2)
    config["data"]["captions_from_labels"] = True
    config["eval"] = {"zeroshot_shards": str(digits / "classification" / "00000.tar"),
                      "classnames": str(digits / "classification" / "classnames.txt"),
                      "templates": str(digits / "classification" / "templates.json"), "batch_size": 180}
    return config


@pytest.fixture(scope="module")
def flyp_runs(digits, tmp_path_factory):
    """(reference run dir, its debug dir with the step keys, resumed run dir)."""
    root = tmp_path_factory.mktemp("flyp")
    config = write_config(root / "run.yaml", flyp_config(digits, root / "run"))
    result = run(deepspeed_command(config), extra_env={"MMCL_DEBUG_DIR": str(root / "debug")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = resume_copy(root / "run", root / "resumed", tag=f"step_{RESUME_AT:08d}")
    config = write_config(root / "resumed.yaml", flyp_config(digits, resumed))
    result = run(deepspeed_command(config, "configs/ds/zero2.json", 2, "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "run", root / "debug", resumed


def shard_labels(folder) -> dict[str, int]:
    labels = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels[member.name[: -len(".cls")]] = int(tar.extractfile(member).read())
    return labels


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_flyp_leaves_out_exactly_the_same_class_pairs_of_the_global_batch(flyp_runs, digits):
    run_dir, debug, _ = flyp_runs
    labels = shard_labels(digits / "train")
    keys: dict[int, list[str]] = {}
    for rank in (0, 1):
        for line in (debug / f"keys_rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            keys.setdefault(entry["step"], []).extend(entry["keys"])
    logged = {r["step"]: r["clip/same_label_pairs"] for r in records(run_dir) if "clip/same_label_pairs" in r}
    assert sorted(logged) == list(range(1, STEPS + 1)) == sorted(keys)
    for step, step_keys in keys.items():
        assert len(step_keys) == 32  # 2 ranks x 2 micro-batches x 8
        expected = sum(n * (n - 1) for n in Counter(labels[k] for k in step_keys).values())
        assert expected > 0 and logged[step] == expected, (step, logged[step], expected)


def test_flyp_run_evaluates_zero_shot_and_resumes_exactly(flyp_runs):
    run_dir, _, resumed = flyp_runs
    reference, continued = losses(run_dir), losses(resumed)
    assert sorted(continued) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in continued:
        assert continued[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
    metrics = json.loads((run_dir / "metrics.json").read_text())
    top1 = metrics["zeroshot/acc1"]
    assert 0.0 <= top1 <= 1.0
    assert json.loads((resumed / "metrics.json").read_text())["zeroshot/acc1"] == pytest.approx(top1, abs=1e-6)
