"""Distillation end to end with the real `deepspeed` launcher and 2 CPU ranks: an OpenCLIP
architecture (random-init weights saved locally) teaches the tiny transformers student under
ZeRO-3 with feature-cache accumulation, and the run resumes exactly; plus the accumulation
equivalence of clip + distill under ZeRO 1, 2 and 3 (in the session's one launch of
tests/e2e/in_process_checks.py). Two launches of its own."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launch import assert_resumed_run_matches, deepspeed_command, resume_copy, run, tiny_run_config, write_config

TINY_OPENCLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 24, "layers": 2, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def openclip_teacher(folder):
    """An open_clip model config registered as 'tiny-openclip-teacher' and its random-init weights."""
    import open_clip

    config = folder / "tiny-openclip-teacher.json"
    config.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(7)
    weights = folder / "teacher.pt"
    torch.save(open_clip.create_model("tiny-openclip-teacher").state_dict(), weights)
    return {"teacher": "openclip:tiny-openclip-teacher", "weights": str(weights), "openclip_config": str(config)}


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def distill_zero3(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_zero3")
    config = tiny_run_config(digits, out / "run", micro_batch_size=8, grad_accum_steps=2, steps=6,
                             checkpoint_every=4, keep_checkpoints=3)
    config["objectives"] = {"clip": 1.0, "distill": 0.5}
    config["distill"] = openclip_teacher(out)
    path = write_config(out / "run.yaml", config)
    result = run(deepspeed_command(path, "configs/ds/zero3.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, out / "run", config["distill"]


def test_distill_trains_beside_clip_with_the_teacher_kept_out_of_checkpoints(distill_zero3):
    from mmcl.objectives.settings import DistillConfig
    from mmcl.objectives.teacher import load_teacher

    _, out, distill = distill_zero3
    logged = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 7))
    for r in logged:
        assert r["loss"] == pytest.approx(r["clip"] + 0.5 * r["distill"], rel=1e-5)
        assert r["distill"] > 0 and 0 <= r["distill/i2t_agree"] <= 1
    state = load_file(out / "checkpoints" / "step_00000006" / "task_state.safetensors")
    assert list(state) == ["distill.teacher_sha256"]  # the teacher itself is never saved
    assert bytes(state["distill.teacher_sha256"].tolist()).hex() == load_teacher(DistillConfig(**distill)).sha256
    exported = load_file(out / "model" / "model.safetensors")
    assert not any("teacher" in name or name.startswith("visual.") for name in exported)


def test_distill_resume_gives_the_same_losses(distill_zero3, tmp_path):
    config, out, _ = distill_zero3
    resumed = resume_copy(out, tmp_path / "resumed")
    result = run(deepspeed_command(config, "configs/ds/zero3.json", 2, f"output_dir={resumed}", "train.resume=latest"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_resumed_run_matches(out, resumed, [5, 6])


def test_clip_plus_distill_feature_cache_step_equals_one_large_batch_step_under_zero1_2_and_3(in_process_checks):
    """Measured by distill_accumulation.py in the session's in_process_checks.py launch."""
    results = in_process_checks["distill_accumulation"]
    assert sorted(results) == ["stage1", "stage2", "stage3"]
    for stage, measured in results.items():
        assert measured["max_diff"] < 1e-5, (stage, measured)
        # the cached step's teacher logits span the whole accumulated global batch, as the large batch's do
        assert measured["accumulated_distill"] == pytest.approx(measured["reference_distill"], rel=1e-6), stage
        assert not measured["teacher_in_engine"], stage
