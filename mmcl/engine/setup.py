"""Setting up a run: the checks that can fail fast, the model and its objectives, DeepSpeed, the data.

`set_up(cfg, ds_user_config, ds_source) -> Run`, in this order: checks on every rank before
any process group (output dir, shards, Hub push, export exactness, the DeepSpeed config and a
resume's layout), so a mistake stops every rank at once → model + tokenizer (seeded, identical
on every rank), its attention kernel, and the task → process group → data stream → AdamW
groups + schedule → DeepSpeed engine. Each decision about how a step runs (attention kernel,
feature caching, loss chunking) is made here, once, and kept on the `Run` or the model.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from mmcl.config import RunConfig, save_config
from mmcl.distributed import get_rank, get_world_size
from mmcl.engine import training_data
from mmcl.engine.attention import EAGER_MAX_TOKENS, choose_attention
from mmcl.engine.compile import check_compile, compile_towers
from mmcl.engine.ds_config import build_deepspeed_config
from mmcl.engine.optim import build_optimizer, lr_lambda
from mmcl.engine.resume import check_resume_layout
from mmcl.engine.run import Run
from mmcl.engine.runtime import TrainingError, check_output_dir, init_process_group, say
from mmcl.engine.sizes import loss_chunk_size, steps_per_epoch
from mmcl.engine.task import TrainingTask
from mmcl.models import build_tokenizer
from mmcl.pretrained import build_model
from mmcl.objectives import uses_feature_cache


def set_up(cfg: RunConfig, ds_user_config: dict[str, Any], ds_source: str) -> Run:
    """The run described by `cfg`, ready to resume or start; see the module docstring."""
    import deepspeed

    started = time.time()
    _check_before_work(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights (and SSL heads, momentum copies) on every rank
    tokenizer = build_tokenizer(cfg.model.text) if cfg.model.text is not None else None
    model = build_model(cfg.model, image_size=cfg.data.image_size)  # pretrained ViTs: positions resized once
    _check_export(model, cfg)
    launch_world_size = int(os.environ.get("WORLD_SIZE", "1"))  # the process group does not exist yet
    ds_config = build_deepspeed_config(cfg, launch_world_size, ds_user_config, ds_source)
    # before the task: momentum copies (BYOL, MoCo, clip_queue) inherit the towers' kernel
    eager_attention = choose_attention(model, cfg.model, bf16=ds_config.get("bf16", {}).get("enabled") is True,
                                       image_size=cfg.data.image_size)
    chunk_size = loss_chunk_size(cfg, launch_world_size)
    task = TrainingTask(model, cfg.objectives, chunk_size, cfg)
    resume_from, layout, saved_layout, changes = check_resume_layout(cfg, Path(cfg.output_dir), launch_world_size, ds_config)
    ds_config.update(_monitor_config(Path(cfg.output_dir)))
    if cfg.train.compile:
        check_compile(cfg, ds_config)

    init_process_group()
    rank, world_size = get_rank(), get_world_size()
    if eager_attention:
        say(f"attention: eager for {' and '.join(eager_attention)} (on the CPU in bf16 it trains faster than SDPA at "
            f"<= {EAGER_MAX_TOKENS} tokens); set attn_implementation: sdpa to keep SDPA")
    if chunk_size is not None and task.uses_logit_scale:
        say(f"image-text loss: chunked exact, {chunk_size}-row chunks (loss.chunk_size={cfg.loss.chunk_size})")
    feature_cache = uses_feature_cache(cfg)
    if cfg.train.accumulation == "feature_cache" and cfg.train.grad_accum_steps > 1 and not feature_cache:
        say(f"objectives {', '.join(cfg.objectives)}: plain gradient accumulation (feature caching applies to "
            "clip/siglip/distill alone)")
    loader = training_data.build(cfg, tokenizer, rank, world_size, teacher=task.teacher_inputs())
    total_steps = _total_steps(cfg, loader, saved_layout, layout)

    optimizer = build_optimizer(task, cfg.optim, prefix="model.")  # groups: towers by name, SSL heads with the heads
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if cfg.train.compile:
        say(f"torch.compile: {', '.join(compile_towers(task.model))} (the first steps include compilation)")
    if rank == 0:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        (Path(cfg.output_dir) / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    return Run(cfg, engine, task, optimizer, tokenizer, loader, total_steps, feature_cache, layout, resume_from,
               saved_layout, changes, started=started)


def _check_before_work(cfg: RunConfig) -> None:
    """Output dir, shards and Hub push: checked on every rank before any model or process group."""
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir)
    if cfg.train.resume is None and (output_dir / "checkpoints" / "latest").exists():
        raise TrainingError(
            f"output_dir '{output_dir}' already holds a run; set train.resume=latest to continue it, or choose a new output_dir."
        )
    training_data.check_shards(cfg)
    if cfg.push_to_hub is not None:
        from mmcl.export import check_push_config

        check_push_config(cfg)  # no token or no network: say so now, not after a long run


def _total_steps(cfg: RunConfig, loader, saved_layout: dict | None, layout: dict) -> int:
    """train.steps, or the epochs' steps; after a global-batch change, the saved run's remaining samples."""
    total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch(loader, cfg)
    if saved_layout is not None and saved_layout.get("global_batch", layout["global_batch"]) != layout["global_batch"]:
        from mmcl.engine import elastic

        total_steps = elastic.remaining_total_steps(saved_layout, layout) or total_steps
        say(f"train.allow_batch_change: global batch {saved_layout['global_batch']} -> {layout['global_batch']}; "
            f"the run now ends at step {total_steps} (its remaining samples in the new batches) and the schedule "
            "is re-derived for that length")
    if total_steps < 1:
        raise TrainingError("the run has 0 steps: the data is smaller than one global batch; lower train.micro_batch_size.")
    return total_steps


def _check_export(model, cfg: RunConfig) -> None:
    """Say now, not after training, when the Hub model would not work in plain transformers; refuse to
    push such a model unless push_to_hub.allow_inexact."""
    from mmcl.export.plan import export_warnings, inexact_sides, plan_export

    context_length = cfg.model.text.context_length if cfg.model.text is not None else None
    if int(os.environ.get("RANK", "0")) == 0:  # the process group does not exist yet: one rank speaks
        for line in export_warnings(model, context_length):
            print(f"[mmcl] warning: {line}", flush=True)
    inexact = inexact_sides(plan_export(model))
    if cfg.push_to_hub is not None and inexact and not cfg.push_to_hub.allow_inexact:
        side = inexact[0]
        instead = f"use {side.alternative}, or " if side.alternative else ""
        raise TrainingError(
            f"push_to_hub would upload a model whose {side.kind} side plain transformers cannot reproduce ({side.reason}); "
            f"{instead}set push_to_hub.allow_inexact: true to push it anyway."
        )


def _monitor_config(output_dir: Path) -> dict[str, Any]:
    return {
        "tensorboard": {"enabled": True, "output_path": str(output_dir / "tensorboard"), "job_name": "train"},
        "csv_monitor": {"enabled": True, "output_path": str(output_dir / "csv"), "job_name": "train"},
    }
