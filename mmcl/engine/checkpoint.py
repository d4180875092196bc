"""Checkpoints that survive a kill at any moment, and exact resume.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's files (any ZeRO stage) + trainer_state_rank{r}.pt
                              (+ task_state.safetensors: state outside DeepSpeed, e.g. BYOL's target)
                              + layout.json (world size, batch sizes, workers: see elastic.py)
    universal/                a DeepSpeed universal copy, only while an elastic resume loads it
    step_00000200/
    latest                    the tag of the newest COMPLETE checkpoint

A checkpoint is written aside under its own tag; only when every rank has finished is
`latest` switched, by an atomic rename of a fully written temporary file. A kill while
writing therefore leaves `latest` pointing at the previous good checkpoint, and the
half-written folder is removed on the next save. Retention deletes older tags only after
the switch. Per-rank trainer state (data-stream position, RNG states) is loaded with
`torch.load(weights_only=True)`: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmcl.distributed import get_rank, get_world_size

LATEST = "latest"
TASK_STATE = "task_state.safetensors"


class ResumeError(ValueError):
    """The requested checkpoint cannot be resumed from."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any], keep: int, task_state: dict[str, torch.Tensor] | None = None,
                    layout: dict[str, Any] | None = None) -> Path:
    """Save engine + trainer state as tag step_{step}; switch `latest`; prune to `keep` tags.

    task_state: tensors DeepSpeed does not hold (the same on every rank), written once by rank 0
    as safetensors. layout: the run's layout (world size, batch sizes, ...; engine/elastic.py),
    written by rank 0 as layout.json.
    """
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    if get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if (root / tag).exists():  # left over by a kill during an earlier save of this step
            shutil.rmtree(root / tag)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    state_path = root / tag / f"trainer_state_rank{get_rank()}.pt"
    temporary = state_path.with_suffix(".tmp")
    torch.save(rank_state, temporary)
    os.replace(temporary, state_path)
    if task_state and get_rank() == 0:
        from safetensors.torch import save_file

        temporary = root / tag / f".{TASK_STATE}.tmp"
        save_file({name: t.detach().cpu().contiguous().clone() for name, t in task_state.items()}, str(temporary))
        os.replace(temporary, root / tag / TASK_STATE)
    if layout is not None and get_rank() == 0:
        temporary = root / tag / ".layout.json.tmp"
        temporary.write_text(json.dumps(layout, indent=2))
        os.replace(temporary, root / tag / "layout.json")
    _barrier()
    if get_rank() == 0:
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep, current=tag)
    _barrier()
    return root / tag


def _prune(root: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[: max(0, len(tags) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(root / old, ignore_errors=True)


def resolve_resume(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoint root, tag) for `resume` = "latest" or a checkpoint folder; None if "latest" has none yet."""
    if resume == LATEST:
        root = checkpoint_root(output_dir)
        if not (root / LATEST).is_file():
            return None
        tag = (root / LATEST).read_text().strip()
        if not (root / tag).is_dir():
            raise ResumeError(f"{root / LATEST} names checkpoint '{tag}', which is missing; pass train.resume=<checkpoint folder>.")
        return root, tag
    folder = Path(resume)
    if not folder.is_dir():
        raise ResumeError(f"train.resume points to '{resume}', which is not a checkpoint folder.")
    return folder.parent, folder.name


def load_rank_state(root: Path, tag: str) -> dict[str, Any]:
    path = root / tag / f"trainer_state_rank{get_rank()}.pt"
    saved_ranks = len(list((root / tag).glob("trainer_state_rank*.pt")))
    if saved_ranks != get_world_size():
        raise ResumeError(
            f"checkpoint {root / tag} was written by {saved_ranks} ranks but this run has {get_world_size()}; "
            "exact resume needs the same number of ranks."
        )
    return torch.load(path, weights_only=True)


def load_task_state(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The task state saved beside a checkpoint ({} when it has none)."""
    path = root / tag / TASK_STATE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The DualEncoder's full fp32 state dict from a checkpoint folder of any ZeRO stage.

    Uses DeepSpeed's zero_to_fp32 path (no process group needed) and strips the task
    module's `model.` prefix, so the result loads with `DualEncoder.load_state_dict`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(checkpoint_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {name[len("model."):]: tensor for name, tensor in state.items() if name.startswith("model.")}
