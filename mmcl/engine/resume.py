"""Resuming a run from its checkpoint: exactly (same layout), or elastically (another world size,
ZeRO stage, workers or micro-batch; see `mmcl.engine.elastic`).

`check_resume_layout` runs before any process group (a changed global batch without
`train.allow_batch_change` stops every rank at once); `resume(run)` loads the checkpoint into the
set-up run and moves its `step` and `samples_seen` on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.distributed import get_rank, get_world_size
from mmcl.engine import elastic
from mmcl.engine.checkpoint import TRUST_HINT, ResumeError, load_rank_state, load_task_state, resolve_resume
from mmcl.engine.rng import restore_rng
from mmcl.engine.runtime import say
from mmcl.safe_unpickle import restricted_unpickling

if TYPE_CHECKING:
    from mmcl.config import RunConfig
    from mmcl.engine.run import Run


def check_resume_layout(cfg: RunConfig, output_dir: Path, world_size: int, ds_config: dict[str, Any]):
    """(checkpoint or None, this launch's layout, the checkpoint's layout or None, changes)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or str(world_size)  # torchrun / deepspeed
    layout = elastic.current_layout(cfg, world_size, int(local), stage)
    found = resolve_resume(cfg.train.resume, output_dir, cfg.train.trust_checkpoint) if cfg.train.resume is not None else None
    if found is None:
        return None, layout, None, []
    saved = elastic.saved_layout(found[0] / found[1])
    return found, layout, saved, elastic.compare(saved, layout, cfg.train.allow_batch_change)


def resume(run: Run) -> None:
    """Load `run.resume_from` (when set) into the engine, the objectives' state, the data stream and the RNGs."""
    if run.resume_from is None:
        return
    root, tag = run.resume_from
    # DeepSpeed's loaders unpickle fully; within this block they load tensors and DeepSpeed's types only
    with restricted_unpickling(str(root / tag), TRUST_HINT, run.cfg.train.trust_checkpoint, error=ResumeError):
        if run.layout_changes:
            run.step, run.samples_seen = _resume_elastic(run, root, tag)
        else:
            _, client_state = run.engine.load_checkpoint(str(root), tag=tag)
            run.step, run.samples_seen = client_state["step"], client_state["samples_seen"]
            run.task.load_extra_state(load_task_state(root, tag))
            rank_state = load_rank_state(root, tag)
            run.loader.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
            say(f"resumed from {root / tag} at step {run.step}")
    run.resumed_at = run.step
    _debug_after_resume(run.engine)


def _resume_elastic(run: Run, root: Path, tag: str) -> tuple[int, int]:
    """Resume `root/tag` written with another layout; returns (step, samples seen)."""
    engine, cfg, saved_layout = run.engine, run.cfg, run.saved_layout
    rank, world_size = get_rank(), get_world_size()
    stage = engine.zero_optimization_stage()
    repartitioned = saved_layout["world_size"] != world_size or saved_layout.get("zero_stage", stage) != stage
    if repartitioned:
        client_state = elastic.load_universal(engine, root, tag)
    else:
        _, client_state = engine.load_checkpoint(str(root), tag=tag)
    step, samples_seen = client_state["step"], client_state["samples_seen"]
    run.task.load_extra_state(load_task_state(root, tag))  # the same tensors on every rank, whatever the world size
    states = elastic.all_rank_states(root / tag)
    same_stream = (len(states) == world_size and states[0]["data"]["num_workers"] == max(1, cfg.data.num_workers)
                   and states[0]["data"]["batch_size"] == cfg.train.micro_batch_size
                   and run.loader.same_schedule(states[0]["data"]))  # NaFlex sequence lengths and token budget
    if same_stream:  # e.g. only the node count changed: the data stream continues exactly
        run.loader.load_state_dict(states[rank]["data"])
        data = {"segment": -1}
    else:
        data = run.loader.load_elastic_state([s["data"] for s in states])
    if len(states) == world_size:
        restore_rng(states[rank]["rng"])
    else:
        elastic.reseed(cfg.seed, step, rank)
    model = ("model and optimizer re-partitioned through a DeepSpeed universal checkpoint (fp32 weights and Adam "
             "moments as saved)" if repartitioned else "model and optimizer loaded as saved")
    say(f"elastic resume from {root / tag} at step {step}: {', '.join(run.layout_changes)}; {model}; "
        f"{_data_position(data, cfg)}; step, schedule, logit scale and momentum/queue state continue; "
        f"{'RNG streams re-seeded per rank' if len(states) != world_size else 'RNG states restored'} "
        "(losses are not bit-identical to an uninterrupted run)")
    return step, samples_seen


def _data_position(data: dict[str, Any], cfg: RunConfig) -> str:
    """Where the data continues after an elastic resume, in words."""
    if data["segment"] == -1:
        return "the data stream continues exactly"
    if data["segment"] == 0:
        return f"data starts epoch {data['epoch']} split over the new ranks x workers"
    if cfg.data.resampled:
        return (f"resampled data: the {data['remaining_batches']} remaining batches per rank of epoch {data['epoch']} are "
                "drawn by the new consumers' own seeded generators (deterministic, not the old consumers' draws)")
    return (f"the samples of epoch {data['epoch']} no rank consumed yet are split over the new ranks x workers and "
            f"each is seen once in its remaining {data['remaining_batches']} batches per rank")


def _debug_after_resume(engine) -> None:
    """MMCL_DEBUG_DIR set: the engine's state right after a resume is saved there as DeepSpeed checkpoint
    `after_resume`, to compare it with the checkpoint it was loaded from."""
    folder = os.environ.get("MMCL_DEBUG_DIR")
    if folder:
        engine.save_checkpoint(folder, tag="after_resume", save_latest=False)
