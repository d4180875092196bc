"""Checkpoints that survive a kill at any moment, and exact resume.

Layout under `<output_dir>/checkpoints/`:

    step_00000100/            DeepSpeed's files (any ZeRO stage) + trainer_state_rank{r}.pt
                              (+ task_state.safetensors: state outside DeepSpeed, e.g. BYOL's target)
                              + layout.json (world size, batch sizes, workers: see elastic.py;
                                and the W&B run id, `wandb_run_id`, when log.wandb is set: tracking.py)
    universal/                a DeepSpeed universal copy, only while an elastic resume loads it
    step_00000200/
    latest                    the tag of the newest COMPLETE checkpoint

A checkpoint is written aside under its own tag; only when every rank has finished is its
manifest written (mmcl_manifest.json: size and SHA-256 of every file, mmcl/manifest.py) and
`latest` switched, by an atomic rename of a fully written temporary file. A kill while
writing therefore leaves `latest` pointing at the previous good checkpoint; a save of the same
tag later replaces the half-written folder. Retention deletes older tags only after the switch,
and only folders with a manifest (never a folder mmcl did not write).

Resuming "latest" checks the checkpoint against its manifest first: a damaged one (a flipped
bit, a copy that stopped halfway) is skipped for the previous intact one, with one line saying
so. Nothing in a checkpoint is unpickled beyond tensors and DeepSpeed's own types
(mmcl/safe_unpickle.py) unless train.trust_checkpoint; per-rank trainer state (data-stream
position, RNG states) is loaded with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmcl import manifest
from mmcl.distributed import get_rank, get_world_size
from mmcl.engine.runtime import TrainingError
from mmcl.safe_unpickle import check_pickles, restricted_unpickling

LATEST = "latest"
TASK_STATE = "task_state.safetensors"
TRUST_HINT = "set train.trust_checkpoint=true"
# The files a save of one tag writes (DeepSpeed's and mmcl's, and their temporaries): a folder of
# only these, without a manifest, is a save that was killed halfway.
_SAVE_FILES = re.compile(r"(bf16_)?(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt|trainer_state_rank\d+\.(pt|tmp)"
                         r"|task_state\.safetensors|layout\.json|mmcl_manifest\.json|\..*\.tmp.*")


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
        if (root / tag).exists():  # left over by a kill during an earlier save of this step, or damaged
            if not written_by_mmcl(root / tag):
                raise TrainingError(f"{root / tag} is in the way of this run's checkpoint and mmcl did not write it; move it elsewhere and resume.")
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
    manifest.write_manifest(root / tag, step)
    _barrier()
    if get_rank() == 0:
        atomic_write_text(root / LATEST, tag)
        _prune(root, keep, current=tag)
    _barrier()
    return root / tag


def written_by_mmcl(folder: Path) -> bool:
    """A checkpoint folder with mmcl's manifest, or one holding only the files a save writes (a killed save)."""
    return manifest.has_manifest(folder) or folder.is_dir() and all(_SAVE_FILES.fullmatch(p.name) for p in folder.iterdir())


def _prune(root: Path, keep: int, current: str) -> None:
    """Delete the oldest tags beyond `keep`; only checkpoints with mmcl's manifest count or go."""
    tags = sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and manifest.has_manifest(p))
    for old in tags[: max(0, len(tags) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(root / old, ignore_errors=True)


def _note(message: str) -> None:
    """One line from the first rank; resume is resolved on every rank before any process group."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[mmcl] {message}", flush=True)


def _previous_intact(root: Path, tag: str) -> str | None:
    """The newest checkpoint older than `tag` whose files match its manifest."""
    older = sorted((p.name for p in root.iterdir() if p.name.startswith("step_") and p.name < tag
                    and manifest.has_manifest(p)), reverse=True)
    return next((name for name in older if manifest.damage(root / name) is None), None)


def resolve_resume(resume: str, output_dir: str | Path, trust: bool = False) -> tuple[Path, str] | None:
    """(checkpoint root, tag) for `resume` = "latest" or a checkpoint folder; None if "latest" has none yet.

    The checkpoint is checked against its manifest: "latest" falls back to the previous intact
    checkpoint when it is damaged (one line says so); a named folder that is damaged is refused.
    Its pickles are checked for objects other than tensors and DeepSpeed's types (unless `trust`).
    """
    if resume == LATEST:
        root = checkpoint_root(output_dir)
        if not (root / LATEST).is_file():
            return None
        tag = (root / LATEST).read_text().strip()
        if not (root / tag).is_dir():
            raise ResumeError(f"{root / LATEST} names checkpoint '{tag}', which is missing; pass train.resume=<checkpoint folder>.")
        problem = _damage(root / tag)
        if problem is not None:
            previous = _previous_intact(root, tag)
            if previous is None:
                raise ResumeError(f"checkpoint {root / tag} is damaged ({problem}) and no earlier intact checkpoint is left; "
                                  "restore it from a copy or start a new run.")
            _note(f"checkpoint {root / tag} is damaged ({problem}); resuming from the previous intact one, {previous}")
            tag = previous
    else:
        folder = Path(resume)
        if not folder.is_dir():
            raise ResumeError(f"train.resume points to '{resume}', which is not a checkpoint folder.")
        root, tag = folder.parent, folder.name
        problem = _damage(folder)
        if problem is not None:
            previous = _previous_intact(root, tag)
            instead = f"pass train.resume={root / previous}" if previous else "restore it from a copy"
            raise ResumeError(f"checkpoint {folder} is damaged ({problem}); {instead}.")
    check_pickles(root / tag, TRUST_HINT, trust, error=ResumeError)
    return root, tag


def _damage(folder: Path) -> str | None:
    """How `folder` differs from its manifest; None when intact or when it has no manifest (said once)."""
    if not (folder / manifest.MANIFEST).exists():
        _note(f"checkpoint {folder} has no {manifest.MANIFEST} (written by an older mmcl?): its files are not checked for damage")
        return None
    return manifest.damage(folder)


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

    Uses DeepSpeed's zero_to_fp32 path (no process group needed; its pickles loaded weights-only)
    and strips the task module's `model.` prefix, so the result loads with `DualEncoder.load_state_dict`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(checkpoint_dir)
    with restricted_unpickling(str(folder), TRUST_HINT, error=ResumeError):
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {name[len("model."):]: tensor for name, tensor in state.items() if name.startswith("model.")}
