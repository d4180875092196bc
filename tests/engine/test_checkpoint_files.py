"""Checkpoint folders from elsewhere: manifests (damage, fallback, pruning) and loads that never run code.

The pickles here are real torch.save files; the crafted ones carry a payload whose __reduce__ would
create a marker file, and every test asserts the marker never appears. DeepSpeed's own loaders
(its TorchCheckpointEngine, zero_to_fp32) run on them unchanged, inside `restricted_unpickling`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmcl import manifest
from mmcl.engine.checkpoint import ResumeError, _prune, resolve_resume, written_by_mmcl
from mmcl.safe_unpickle import (NO_FORCE, UnsafeCheckpoint, check_pickles, restricted_unpickling,
                                       weights_file_problem)


class Payload:
    """Unpickling it runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def checkpoint(folder: Path, step: int, with_manifest: bool = True) -> Path:
    """A checkpoint-shaped folder: DeepSpeed-named torch files of tensors, and its manifest."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    torch.save({"module": {"w": torch.randn(64, 64, generator=generator)}, "global_steps": step},
               folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"m": torch.randn(256, generator=generator)}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"data": {"epoch": 0}}, folder / "trainer_state_rank0.pt")
    (folder / "layout.json").write_text('{"world_size": 1}')
    if with_manifest:
        manifest.write_manifest(folder, step)
    return folder


def run_with_checkpoints(tmp_path: Path, steps: list[int], latest: int) -> Path:
    root = tmp_path / "run" / "checkpoints"
    for step in steps:
        checkpoint(root / f"step_{step:08d}", step)
    (root / "latest").write_text(f"step_{latest:08d}")
    return root


def test_manifest_names_a_flipped_bit_a_truncated_file_and_a_missing_one(tmp_path):
    folder = checkpoint(tmp_path / "step_00000004", 4)
    assert manifest.damage(folder) is None
    states = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    assert manifest.damage(folder) == "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its SHA-256"
    states.write_bytes(bytes(data[: len(data) // 2]))
    assert manifest.damage(folder) == f"zero_pp_rank_0_mp_rank_00_optim_states.pt has {len(data) // 2} bytes instead of {len(data)}"
    states.unlink()
    assert manifest.damage(folder) == "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"


def test_resume_latest_falls_back_to_the_previous_intact_checkpoint_in_one_line(tmp_path, capsys):
    root = run_with_checkpoints(tmp_path, [4, 8, 12], latest=12)
    for tag in ("step_00000012", "step_00000008"):  # a copy that stopped halfway, and bit rot
        states = root / tag / "mp_rank_00_model_states.pt"
        data = states.read_bytes()
        states.write_bytes(data[: len(data) // 2] if tag.endswith("12") else data[:-1] + bytes([data[-1] ^ 1]))
    assert resolve_resume("latest", root.parent) == (root, "step_00000004")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"[mmcl] checkpoint {root / 'step_00000012'} is damaged (mp_rank_00_model_states.pt has ")
    assert lines[0].endswith("; resuming from the previous intact one, step_00000004")


def test_resume_of_a_named_damaged_checkpoint_is_refused_naming_the_intact_one(tmp_path):
    root = run_with_checkpoints(tmp_path, [4, 8], latest=8)
    (root / "step_00000008" / "trainer_state_rank0.pt").write_bytes(b"")
    with pytest.raises(ResumeError) as error:
        resolve_resume(str(root / "step_00000008"), tmp_path)
    assert str(error.value) == (f"checkpoint {root / 'step_00000008'} is damaged (trainer_state_rank0.pt has 0 bytes "
                                f"instead of {(root / 'step_00000004' / 'trainer_state_rank0.pt').stat().st_size}); "
                                f"pass train.resume={root / 'step_00000004'}.")


def test_resume_with_no_intact_checkpoint_left_is_one_sentence(tmp_path):
    root = run_with_checkpoints(tmp_path, [4], latest=4)
    (root / "step_00000004" / "layout.json").unlink()
    with pytest.raises(ResumeError, match=r"is damaged \(layout.json is missing\) and no earlier intact checkpoint is left"):
        resolve_resume("latest", root.parent)


def test_resume_refuses_a_checkpoint_with_a_crafted_pickle_and_never_runs_it(tmp_path):
    root = run_with_checkpoints(tmp_path, [4], latest=4)
    marker = tmp_path / "marker"
    torch.save({"module": Payload(marker)}, root / "step_00000004" / "mp_rank_00_model_states.pt")
    manifest.write_manifest(root / "step_00000004", 4)  # the forger rewrote the manifest too
    with pytest.raises(ResumeError) as error:
        resolve_resume("latest", root.parent)
    assert str(error.value) == (
        f"{root / 'step_00000004' / 'mp_rank_00_model_states.pt'} holds a pickled 'posix.system', which is neither a "
        "tensor nor one of DeepSpeed's own types, and unpickling it could run code, so mmcl does not load it; use only "
        "checkpoints you or mmcl wrote (set train.trust_checkpoint=true only if you trust its author).")
    assert not marker.exists()


def test_deepspeed_loaders_are_weights_only_inside_the_block_and_never_run_a_payload(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt" / "step_00000002"
    folder.mkdir(parents=True)
    torch.save({"module": Payload(marker)}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loads = [lambda: TorchCheckpointEngine().load(str(folder / "mp_rank_00_model_states.pt")),
             lambda: get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)]
    for load in loads:
        with pytest.raises(UnsafeCheckpoint, match=r"holds a pickled 'posix.system'"):
            with restricted_unpickling(str(folder), "pass --trust-checkpoint"):
                load()
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is put back after the block


def test_deepspeeds_own_types_load_inside_the_block(tmp_path, monkeypatch):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    monkeypatch.setenv(NO_FORCE, "1")  # a user's override of torch's default is lifted in the block, then restored
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(4.0), "dynamic": DynamicLossScaler(8.0, 1000, 1, False, True),
                "zero_stage": ZeroStageEnum.gradients, "slices": {"w": fragment_address(numel=3, start=5)},
                "moments": torch.arange(3.0)}, path)
    check_pickles(tmp_path, "pass --trust-checkpoint")
    with restricted_unpickling(str(tmp_path), "pass --trust-checkpoint"):
        state = torch.load(path, weights_only=False)
    assert state["loss_scaler"].cur_scale == 4.0 and state["dynamic"].cur_scale == 8.0
    assert state["zero_stage"] is ZeroStageEnum.gradients and state["slices"]["w"] == fragment_address(numel=3, start=5)
    assert torch.equal(state["moments"], torch.arange(3.0))
    assert os.environ[NO_FORCE] == "1"


def test_pruning_deletes_only_checkpoints_with_mmcls_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12, 16):
        checkpoint(root / f"step_{step:08d}", step)
    foreign = root / "step_00000001"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    legacy = checkpoint(root / "step_00000002", 2, with_manifest=False)  # no manifest: not provably mmcl's
    (root / "backup").mkdir()
    _prune(root, keep=2, current="step_00000016")
    assert sorted(p.name for p in root.iterdir()) == ["backup", "step_00000001", "step_00000002", "step_00000012",
                                                      "step_00000016"]
    assert (foreign / "notes.txt").read_text() == "mine" and legacy.is_dir()


def test_a_killed_save_is_recognised_as_mmcls_and_a_foreign_folder_is_not(tmp_path):
    killed = tmp_path / "step_00000008"
    killed.mkdir()
    (killed / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (killed / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"half")
    (killed / "trainer_state_rank0.tmp").write_bytes(b"half")
    assert written_by_mmcl(killed)
    (killed / "thesis.tex").write_text("mine")
    assert not written_by_mmcl(killed)
    assert written_by_mmcl(checkpoint(tmp_path / "step_00000004", 4))


def test_weights_files_are_checked_before_loading(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "marker"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "crafted.pt")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "plain.pt")
    save_file({"visual.proj": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.safetensors").write_text("not weights")
    assert weights_file_problem(Path("/dev/null")) == "is not a regular file"
    assert weights_file_problem(tmp_path) == "is not a regular file"
    assert weights_file_problem(tmp_path / "missing.pt") == "does not exist"
    assert weights_file_problem(tmp_path / "empty.pt") == "is empty"
    assert weights_file_problem(tmp_path / "text.safetensors").startswith("is not a readable safetensors file (")
    assert weights_file_problem(tmp_path / "crafted.pt") == (
        "holds a pickled 'posix.system', not only tensors, and unpickling it could run code")
    assert weights_file_problem(tmp_path / "plain.pt") is None
    assert weights_file_problem(tmp_path / "plain.safetensors") is None
    assert not marker.exists()


def test_a_truncated_pickle_without_manifest_is_one_sentence(tmp_path):
    folder = checkpoint(tmp_path / "step_00000004", 4, with_manifest=False)
    states = folder / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    with pytest.raises(UnsafeCheckpoint, match=r"mp_rank_00_model_states.pt is not a readable torch file \(.*\); "
                                               r"the checkpoint is damaged or was not written by torch.save.$"):
        check_pickles(folder, "pass --trust-checkpoint")
