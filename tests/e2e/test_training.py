"""End to end: the real `deepspeed` launcher, 2 CPU ranks, ZeRO 1/2/3, real shards and tokenizer.

One reference run per ZeRO stage serves several checks: the loss goes down, checkpoints and
outputs exist, and a resumed run reproduces its later losses exactly. The reference runs are the
session's (`zero_runs`, tests/e2e/conftest.py), which tests/e2e/test_export.py exports too; the
launches here skip their end-of-run evaluation (`NO_EVAL`).
"""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from launch import NO_EVAL, ZERO_STAGES, ZERO_STEPS, deepspeed_command, kill_tree, latest_tag, losses, run, start, wait_for

STAGES, STEPS = ZERO_STAGES, ZERO_STEPS


@pytest.fixture(scope="module")
def reference_runs(zero_runs):
    """The session's ZeRO 1/2/3 runs (conftest.py: zero_runs; tests/e2e/test_export.py exports them)."""
    return zero_runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_training_under_zero_stage_lowers_the_loss_and_writes_outputs(reference_runs, stage):
    _, out, result = reference_runs[stage]
    loss, last = losses(out), STEPS[stage]
    assert sorted(loss) == list(range(1, last + 1))
    assert (loss[last - 1] + loss[last]) / 2 < (loss[1] + loss[2]) / 2 - 0.05, loss
    assert latest_tag(out) == f"step_{last:08d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        f"step_{s:08d}" for s in range(4, last + 1, 4)]
    assert {p.name for p in (out / "model").iterdir()} >= {"config.yaml", "model.safetensors"}
    assert json.loads((out / "metrics.json").read_text())["steps"] == last
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file()
    # rank 0 alone prints the log lines
    assert result.stdout.count(f"[mmcl] step {last}/{last}") == 1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_continues_with_identical_losses(reference_runs, stage, tmp_path):
    config, out, _ = reference_runs[stage]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    # A kill while step 6 was being written left a partial folder; `latest` still names step 4.
    (resumed / "checkpoints" / "step_00000006").mkdir()
    (resumed / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    result = run(deepspeed_command(config, STAGES[stage], 2, f"output_dir={resumed}", "train.resume=latest", *NO_EVAL))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_00000004" in result.stdout
    expected, got = losses(out), losses(resumed)
    assert sorted(got) == list(range(5, STEPS[stage] + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)


def test_sigterm_saves_and_kill_9_loses_nothing(reference_runs, tmp_path):
    """SIGTERM: finish the step, save, exit 0. kill -9: resume from the last checkpoint, same losses.
    Logged to W&B offline (log.wandb): the three launches are one W&B run whose history is metrics.jsonl
    (tests/wandb_history.py reads W&B's files back)."""
    config, out, _ = reference_runs[2]
    target = tmp_path / "interrupted"
    slow = ["train.checkpoint_every=2", "log.wandb.mode=offline", *NO_EVAL]
    process = start(deepspeed_command(config, STAGES[2], 2, f"output_dir={target}", *slow))
    wait_for(lambda: latest_tag(target) is not None, what="first checkpoint")
    kill_tree(process, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "stop requested: saved step" in output, output[-3000:]
    stopped_at = int(latest_tag(target).split("_")[1])
    assert 2 <= stopped_at < STEPS[2]

    def logged_past_a_new_checkpoint() -> bool:  # then the kill drops records that metrics.jsonl (and W&B) had
        tag = latest_tag(target)
        if tag in (None, f"step_{stopped_at:08d}"):
            return False
        steps = [json.loads(line)["step"] for line in (target / "metrics.jsonl").read_text().split("\n")[:-1] if line]
        return max(steps, default=0) > int(tag.split("_")[1])

    # Checkpoints every 4 steps here: 3 steps logged past each one leave the poll a window to kill in.
    process = start(deepspeed_command(config, STAGES[2], 2, f"output_dir={target}", "train.resume=latest", *slow,
                                      "train.checkpoint_every=4"))
    wait_for(lambda: logged_past_a_new_checkpoint() or process.poll() is not None,
             what="a step logged past a checkpoint after resume")
    kill_tree(process, signal.SIGKILL)
    process.communicate(timeout=60)
    killed_at = latest_tag(target)
    assert int(killed_at.split("_")[1]) < STEPS[2], "the run ended before it could be killed"

    result = run(deepspeed_command(config, STAGES[2], 2, f"output_dir={target}", "train.resume=latest", *slow))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {target / 'checkpoints' / killed_at}" in result.stdout
    expected, got = losses(out), losses(target)
    for step in range(int(killed_at.split("_")[1]) + 1, STEPS[2] + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    from wandb_history import check_against_metrics

    evidence = check_against_metrics(target, resumed_at=[stopped_at, int(killed_at.split("_")[1])])
    assert evidence["launches"] == 3 and evidence["steps"] == STEPS[2] and evidence["plot"]["_type"] == "image-file"
    assert json.loads((target / "checkpoints" / f"step_{STEPS[2]:08d}" / "layout.json").read_text())["wandb_run_id"] == evidence["run_id"]
    print("W&B evidence:", {"stopped_at": stopped_at, "killed_at": killed_at, **{k: v for k, v in evidence.items() if k != "plot"}})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidated_fp32_state_dict_loads_back(reference_runs, stage):
    import torch
    from safetensors.torch import load_file

    from mmcl.config import load_config
    from mmcl.engine.checkpoint import consolidated_state_dict
    from mmcl.pretrained import build_model

    _, out, _ = reference_runs[stage]
    state = consolidated_state_dict(out / "checkpoints" / f"step_{STEPS[stage]:08d}")
    exported = load_file(out / "model" / "model.safetensors")
    model = build_model(load_config(out / "config.yaml").model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    # parameters come back exactly; only non-persistent buffers (e.g. position ids) are absent
    assert all(name not in dict(model.named_parameters()) for name in missing)
    for name, tensor in state.items():
        assert torch.equal(tensor, exported[name]), name


def test_truncated_latest_checkpoint_resumes_from_the_previous_one_and_pruning_spares_foreign_folders(reference_runs, tmp_path):
    """latest (step 8) has a file cut in half: resume says so in one line, continues from step 4 with the
    reference losses, and keep_checkpoints=2 deletes only checkpoints with mmcl's manifest."""
    from mmcl.manifest import damage

    config, out, _ = reference_runs[2]
    resumed = tmp_path / "resumed"
    for tag in ("step_00000004", "step_00000008"):
        shutil.copytree(out / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text("step_00000008")
    cut = resumed / "checkpoints" / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: size // 2])
    foreign = resumed / "checkpoints" / "step_00000001"  # a user's folder that looks like a tag
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = run(deepspeed_command(config, STAGES[2], 2, f"output_dir={resumed}", "train.resume=latest",
                                   "train.keep_checkpoints=2", *NO_EVAL))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    damaged = [line for line in result.stdout.splitlines() if "damaged" in line]
    assert damaged == [f"[mmcl] checkpoint {resumed / 'checkpoints' / 'step_00000008'} is damaged (zero_pp_rank_1_mp_rank_00_"
                       f"optim_states.pt has {size // 2} bytes instead of {size}); resuming from the previous intact one, "
                       "step_00000004"]
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000004'} at step 4" in result.stdout
    expected, got = losses(out), losses(resumed)
    assert sorted(got) == list(range(5, STEPS[2] + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.is_dir()) == [
        "step_00000001", "step_00000012", "step_00000016"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert damage(resumed / "checkpoints" / "step_00000016") is None


class Payload:
    """Unpickling it runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_is_refused_by_export_and_resume_and_its_payload_never_runs(reference_runs, tmp_path):
    """A run folder someone gave us: a real checkpoint whose model states and one optimizer partition are
    pickles with a payload, and a manifest rewritten to match. Neither command unpickles them."""
    import subprocess

    import torch

    from launch import BIN, REPO, env
    from mmcl.manifest import write_manifest

    config, out, _ = reference_runs[2]
    crafted, marker = tmp_path / "given_run", tmp_path / "marker"
    shutil.copytree(out / "checkpoints" / "step_00000004", crafted / "checkpoints" / "step_00000004")
    (crafted / "checkpoints" / "latest").write_text("step_00000004")
    shutil.copy(out / "config.yaml", crafted / "config.yaml")
    folder = crafted / "checkpoints" / "step_00000004"
    torch.save({"module": Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_manifest(folder, 4)
    refusal = (f"{folder / 'mp_rank_00_model_states.pt'} holds a pickled 'posix.system', which is neither a tensor nor "
               "one of DeepSpeed's own types, and unpickling it could run code, so mmcl does not load it; use only "
               "checkpoints you or mmcl wrote")

    exported = subprocess.run([str(BIN / "mmcl"), "export", "--run", str(crafted), "--out", str(tmp_path / "export")],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 2, exported.stdout + exported.stderr
    assert exported.stderr == f"mmcl: error: {refusal} (pass --trust-checkpoint only if you trust its author).\n"
    assert not (tmp_path / "export").exists()

    resumed = run(deepspeed_command(config, STAGES[2], 2, f"output_dir={crafted}", "train.resume=latest"))
    assert resumed.returncode != 0
    assert f"{refusal} (set train.trust_checkpoint=true only if you trust its author)." in resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert not marker.exists()
