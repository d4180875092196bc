"""Elastic resume: continue a checkpoint on a different world size, node count, data workers or micro batch.

What each part does on a changed layout:

- layout: every checkpoint has a `layout.json` (world size, nodes, micro batch, accumulation,
  data workers, global batch, step, total steps). `check` compares it with the new launch before
  any process group exists: a changed global batch is an error unless
  `train.allow_batch_change`, which re-derives the remaining steps from the remaining samples.
- model and optimizer (world size changed): rank 0 converts the checkpoint with DeepSpeed's own
  `deepspeed.checkpoint.ds_to_universal` (ZeRO 1, 2 and 3) into `checkpoints/universal/<tag>`,
  and every rank loads it with DeepSpeed's universal loader (`checkpoint.load_universal`), which
  re-partitions fp32 weights and Adam moments for the new world size. Three gaps of that route are
  closed here, without re-sharding any optimizer tensor: persistent module buffers (DeepSpeed's
  universal load restores parameters only) are copied from the checkpoint's module state; the
  per-group hyperparameters (DeepSpeed's ZeRO-3 universal load copies group 0's onto every
  group) are put back from the universal checkpoint's own optimizer state; and under ZeRO 1/2 a
  rank whose partition holds no fragment of a small group no longer fails (universal_fix.py).
- data: see mmcl/data/elastic.py (the rest of the epoch split over the new consumers).
- RNG: the saved per-rank RNG states belong to ranks that no longer exist; every rank is re-seeded
  from (seed, step, rank), deterministic but not the uninterrupted run's streams.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmcl.config import RunConfig
from mmcl.engine.checkpoint import ResumeError
from mmcl.engine.sizes import global_batch, micro_batch
from mmcl.engine.universal_fix import tolerate_empty_partitions

LAYOUT = "layout.json"
UNIVERSAL = "universal"


def current_layout(cfg: RunConfig, world_size: int, local_world_size: int, zero_stage: int | None = None) -> dict[str, Any]:
    """This launch's layout (what layout.json records)."""
    return {
        "world_size": world_size,
        "nodes": max(1, world_size // max(1, local_world_size)),
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "num_workers": cfg.data.num_workers,
        "global_batch": global_batch(micro_batch(cfg), cfg.train.grad_accum_steps, world_size),  # a token budget's mean
        **({"zero_stage": zero_stage} if zero_stage is not None else {}),
        **_naflex_schedule(cfg),
    }


NAFLEX_SCHEDULE = {"sequence_lengths": "data.naflex.sequence_lengths", "token_budget": "data.naflex.token_budget"}


def _naflex_schedule(cfg: RunConfig) -> dict[str, Any]:
    """data.naflex's per-step lengths and token budget, when set: another list or budget changes every later
    batch, so a resume with them changed continues the epoch elastically (in expected samples)."""
    naflex = cfg.data.naflex
    if naflex is None or (naflex.sequence_lengths is None and naflex.token_budget is None):
        return {}
    return {"sequence_lengths": naflex.sequence_lengths, "token_budget": naflex.token_budget}


def saved_layout(folder: Path) -> dict[str, Any]:
    """The layout a checkpoint was written with (rebuilt from rank 0's data state for checkpoints
    written before layout.json existed; their accumulation is unknown and taken as unchanged)."""
    path = folder / LAYOUT
    if path.is_file():
        return json.loads(path.read_text())
    ranks = len(list(folder.glob("trainer_state_rank*.pt")))
    data = torch.load(folder / "trainer_state_rank0.pt", weights_only=True)["data"]
    return {"world_size": ranks, "micro_batch_size": int(data["batch_size"]), "num_workers": int(data["num_workers"])}


def compare(saved: dict[str, Any], now: dict[str, Any], allow_batch_change: bool) -> list[str]:
    """The changes from `saved` to `now` as 'name a -> b' phrases; raises ResumeError for a changed
    global batch unless allowed."""
    saved = dict(saved)
    saved.setdefault("grad_accum_steps", now["grad_accum_steps"])
    saved.setdefault("global_batch", global_batch(saved["micro_batch_size"], saved["grad_accum_steps"], saved["world_size"]))
    names = {"world_size": "world size", "nodes": "nodes", "num_workers": "data.num_workers",
             "micro_batch_size": "train.micro_batch_size", "grad_accum_steps": "train.grad_accum_steps",
             "zero_stage": "ZeRO stage"}
    changes = [f"{label} {saved[key]} -> {now[key]}" for key, label in names.items()
               if key in saved and key in now and saved[key] != now[key]]
    changes += [f"{label} {saved.get(key)} -> {now.get(key)}" for key, label in NAFLEX_SCHEDULE.items()
                if saved.get(key) != now.get(key)]  # absent = unset
    if saved["global_batch"] != now["global_batch"]:
        if not allow_batch_change:
            raise ResumeError(
                f"the checkpoint was trained with a global batch of {saved['global_batch']} and this launch has "
                f"{now['global_batch']} (micro x accumulation x world size); keep {saved['global_batch']} or set "
                "train.allow_batch_change=true."
            )
        changes.append(f"global batch {saved['global_batch']} -> {now['global_batch']}")
    return changes


def remaining_total_steps(saved: dict[str, Any], now: dict[str, Any]) -> int | None:
    """With a changed global batch: the run's new total steps, so that the samples it still had to see
    are seen in the new batches (step + remaining samples // new global batch); None if unknown."""
    if "total_steps" not in saved or "step" not in saved or "samples_seen" not in saved:
        return None
    remaining = int(saved["total_steps"]) * int(saved["global_batch"]) - int(saved["samples_seen"])
    return int(saved["step"]) + max(0, remaining) // int(now["global_batch"])


def universal_folder(root: Path, tag: str) -> Path:
    return root / UNIVERSAL / tag


def convert_to_universal(root: Path, tag: str) -> Path:
    """Rank 0 converts checkpoint `root/tag` with DeepSpeed's ds_to_universal (written aside, then
    renamed into place, so a kill leaves no half folder); every rank returns its path."""
    from mmcl.distributed import get_rank

    target = universal_folder(root, tag)
    if get_rank() == 0 and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        temporary = target.with_name(f".{tag}.converting")
        _remove_own(temporary)  # what a killed conversion left
        temporary.parent.mkdir(parents=True, exist_ok=True)
        args = Namespace(input_folder=str(root / tag), output_folder=str(temporary), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, once per parameter
            ds_to_universal(args)
        os.replace(temporary, target)
        (target.parent / "latest_universal").write_text(tag)
    if dist.is_initialized():
        dist.barrier()
    return target


def load_universal(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load `root/tag` (a DeepSpeed checkpoint of another world size) into `engine` through DeepSpeed's
    universal checkpoint; returns the client state."""
    from mmcl.distributed import get_rank

    folder = convert_to_universal(root, tag)
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads it at load time only
    try:
        with tolerate_empty_partitions():
            _, client_state = engine.load_checkpoint(str(folder.parent), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    if client_state is None:
        raise ResumeError(f"DeepSpeed could not load the universal checkpoint {folder}.")
    if engine.zero_optimization_stage() == 3:  # its universal load copies group 0's hyperparameters onto every group
        # weights_only=False as DeepSpeed does; resume's restricted_unpickling block makes it weights-only
        saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        groups = saved.get("optimizer_state_dict", saved)["param_groups"]
        for group, values in zip(engine.optimizer.param_groups, groups):
            group.update({k: v for k, v in values.items() if k != "params"})
    _restore_buffers(engine, root / tag)
    if dist.is_initialized():
        dist.barrier()
    if get_rank() == 0:
        discard_universal(root, tag)  # the original checkpoint stays; the copy is not needed
    return client_state


def _remove_own(path: Path) -> None:
    """Remove `path`, a name only mmcl gives; a link there goes without what it points to."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def discard_universal(root: Path, tag: str) -> None:
    """Delete the universal copy of `root/tag` and `latest_universal` when it names it; other conversions
    and anything else in `root/universal` stay, and the folder goes only once empty."""
    if not tag or Path(tag).name != tag or tag in (".", ".."):  # a tag that is not one folder name names nothing of ours
        return
    folder = universal_folder(root, tag)
    _remove_own(folder)
    pointer = folder.parent / "latest_universal"
    if pointer.is_file() and not pointer.is_symlink() and pointer.read_text().strip() == tag:
        pointer.unlink()
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when empty


def _restore_buffers(engine, folder: Path) -> None:
    """Persistent buffers (e.g. BatchNorm statistics) from the checkpoint's module state: DeepSpeed's
    universal load restores parameters only. It is loaded as DeepSpeed loads it (weights_only=False),
    within resume's restricted_unpickling block, which makes every load weights-only (safe_unpickle.py)."""
    names = {name for name, _ in engine.module.named_buffers()}
    persistent = [name for name in engine.module.state_dict() if name in names]
    if not persistent:
        return
    state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    buffers = dict(engine.module.named_buffers())
    with torch.no_grad():
        for name in persistent:
            if name in state and state[name].shape == buffers[name].shape:
                buffers[name].copy_(state[name])


def all_rank_states(folder: Path) -> list[dict[str, Any]]:
    """Every saved rank's trainer state, in rank order."""
    count = len(list(folder.glob("trainer_state_rank*.pt")))
    return [torch.load(folder / f"trainer_state_rank{r}.pt", weights_only=True) for r in range(count)]


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, deterministic RNG streams for a rank that has no saved state of its own."""
    from mmcl.data.shards import derive_seed

    value = derive_seed(seed, "elastic-resume", step, rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value % 2**63)
