"""The training loop under DeepSpeed, top to bottom.

`train(cfg, ds_user_config)`:
  checks that can fail fast (paths, output dir, shards) on every rank, before any
  process group → model + tokenizer (seeded, identical on every rank) → process group →
  data stream → DeepSpeed engine (AdamW groups + schedule) → resume → steps, with
  logging, evaluation, checkpoints and clean stops → final checkpoint, model folder,
  metrics and plot.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmcl.config import KNOWN_OBJECTIVES, RunConfig, save_config
from mmcl.distributed import get_rank, get_world_size
from mmcl.engine.compile import check_compile, compile_towers
from mmcl.engine.checkpoint import (capture_rng, load_rank_state, load_task_state, resolve_resume, restore_rng,
                                    save_checkpoint)
from mmcl.engine import elastic
from mmcl.engine.ds_config import build_deepspeed_config
from mmcl.engine.metrics_log import MetricsLog, plot_history
from mmcl.engine.objectives import loss_chunk_size
from mmcl.engine.optim import lr_lambda, parameter_groups
from mmcl.engine.runtime import (TrainingError, check_output_dir, init_process_group, move_batch,
                                 say)
from mmcl.engine.step_timer import StepTimer, reduce_window
from mmcl.engine.steps import feature_cache_step, plain_step
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model, build_tokenizer
from mmcl.models.patch_dropout import patch_dropout_active, patch_dropout_hooks, set_patch_dropout


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0


def train(cfg: RunConfig, ds_user_config: dict[str, Any], ds_source: str = "DeepSpeed config") -> dict[str, Any]:
    """Run (or resume) the training described by `cfg`; returns the final metrics (rank 0's view)."""
    import deepspeed

    from mmcl.engine import data_stream

    started = time.time()
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir)
    if cfg.train.resume is None and (output_dir / "checkpoints" / "latest").exists():
        raise TrainingError(
            f"output_dir '{output_dir}' already holds a run; set train.resume=latest to continue it, or choose a new output_dir."
        )
    data_stream.check_shards(cfg)
    if cfg.push_to_hub is not None:
        from mmcl.export import check_push_config

        check_push_config(cfg)  # no token or no network: say so now, not after a long run

    torch.manual_seed(cfg.seed)  # identical initial weights (and SSL heads, BYOL target) on every rank
    tokenizer = build_tokenizer(cfg.model.text) if cfg.model.text is not None else None
    model = build_model(cfg.model, image_size=cfg.data.image_size)  # pretrained ViTs: positions resized once
    _check_export(model, cfg)
    launch_world_size = int(os.environ.get("WORLD_SIZE", "1"))  # the process group does not exist yet
    chunk_size = loss_chunk_size(cfg, launch_world_size)
    task = TrainingTask(model, cfg.objectives, chunk_size, cfg)

    # Checked before the process group exists, so a contradiction stops every rank at once.
    ds_config = build_deepspeed_config(cfg, launch_world_size, ds_user_config, ds_source)
    resume_from, layout, saved_layout, layout_changes = _check_resume_layout(cfg, output_dir, launch_world_size, ds_config)
    ds_config.update(_monitor_config(output_dir))
    if cfg.train.compile:
        check_compile(cfg, ds_config)
    init_process_group()
    rank, world_size = get_rank(), get_world_size()
    if chunk_size is not None and task.uses_logit_scale:
        say(f"contrastive loss: tiled exact, {chunk_size}-row tiles (loss.chunk_size={cfg.loss.chunk_size})")
    loader = data_stream.build(cfg, tokenizer, rank, world_size, teacher=task.teacher_inputs())
    total_steps = cfg.train.steps or cfg.train.epochs * data_stream.steps_per_epoch(loader, cfg, world_size)
    if saved_layout is not None and saved_layout.get("global_batch", layout["global_batch"]) != layout["global_batch"]:
        total_steps = elastic.remaining_total_steps(saved_layout, layout) or total_steps
        say(f"train.allow_batch_change: global batch {saved_layout['global_batch']} -> {layout['global_batch']}; "
            f"the run now ends at step {total_steps} (its remaining samples in the new batches) and the schedule "
            "is re-derived for that length")
    if total_steps < 1:
        raise TrainingError("the run has 0 steps: the data is smaller than one global batch; lower train.micro_batch_size.")

    groups = parameter_groups(task, cfg.optim, prefix="model.")  # towers by name; SSL heads with the heads
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if cfg.train.compile:
        say(f"torch.compile: {', '.join(compile_towers(task.model))} (the first steps include compilation)")
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    step, samples_seen, resumed_at = 0, 0, None
    if resume_from is not None:
        root, tag = resume_from
        if not layout_changes:
            _, client_state = engine.load_checkpoint(str(root), tag=tag)
            step, samples_seen = client_state["step"], client_state["samples_seen"]
            task.load_extra_state(load_task_state(root, tag))
            rank_state = load_rank_state(root, tag)
            loader.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
            resumed_at = step
            say(f"resumed from {root / tag} at step {step}")
        else:
            step, samples_seen = _resume_elastic(engine, loader, task, cfg, root, tag, saved_layout, layout_changes)
            resumed_at = step
        _debug_after_resume(engine)

    log = MetricsLog(output_dir, engine, enabled=rank == 0)
    log.truncate_after(step)
    stop = StopRequested()
    use_cache = cfg.train.accumulation == "feature_cache" and cfg.train.grad_accum_steps > 1
    if use_cache and not task.cacheable:
        say(f"objectives {', '.join(cfg.objectives)}: plain gradient accumulation (feature caching applies to "
            "clip/siglip alone)")
        use_cache = False
    gather = _gatherer(engine)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    nonfinite_in_row, nonfinite_total = 0, 0
    progress = _progress_bar(total_steps, step, rank)
    window_start, window_samples = time.time(), 0
    timer = StepTimer(engine.device)  # data / forward+backward / optimizer seconds per log window
    batches = data_stream.endless(loader)
    final_metrics: dict[str, Any] = {}
    patch_dropout = patch_dropout_hooks(task)
    if patch_dropout:
        unmasked_from = max(total_steps - cfg.train.patch_dropout_final_steps, 0)
        say(f"patch dropout {cfg.model.image.patch_dropout}: steps 1-{unmasked_from} drop patch tokens"
            + (f", steps {unmasked_from + 1}-{total_steps} see every token" if unmasked_from < total_steps else ""))

    key_log = _debug_key_log(rank)
    while step < total_steps:
        with timer.phase("data"):
            micro_batches = [move_batch(next(batches), engine) for _ in range(cfg.train.grad_accum_steps)]
        if patch_dropout:  # a function of the step alone, so a resumed run switches at the same step
            set_patch_dropout(task, patch_dropout_active(step, total_steps, cfg.train.patch_dropout_final_steps))
        if key_log is not None:
            key_log.write(json.dumps({"step": step + 1, "keys": [k for b in micro_batches for k in b["keys"]]}) + "\n")
            key_log.flush()
        with timer.phase("forward_backward"):  # engine.step() inside is charged to "optimizer"
            metrics, nonfinite = (feature_cache_step if use_cache else plain_step)(engine, micro_batches, timer)
        step += 1
        if metrics is not None:  # the optimizer stepped: per-step updates (BYOL's EMA target)
            metrics.update({k: torch.tensor(v) for k, v in task.after_optimizer_step(step, total_steps, gather).items()})
        samples_seen += global_batch
        window_samples += global_batch
        nonfinite_total += nonfinite
        nonfinite_in_row = nonfinite_in_row + 1 if metrics is None else 0
        if nonfinite_in_row >= cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"the loss was non-finite for {nonfinite_in_row} steps in a row (step {step}); lower optim.lr or check the data."
            )
        progress.update(1)
        if metrics is not None and (step % cfg.train.log_every == 0 or step == total_steps):
            elapsed = time.time() - window_start
            values = _reduce_metrics(metrics)
            values.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups if "name" in g})
            values["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            values["samples_per_s_per_rank"] = values["samples_per_s"] / world_size
            values["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
            values["nonfinite_steps"] = nonfinite_total
            if patch_dropout:  # tokens per image the image tower's layers saw in the last training forward
                values["image_tokens"] = patch_dropout[0].tokens_out
            values.update({f"skipped/{k}": v for k, v in data_stream.skip_counts(loader).items()})
            values.update(reduce_window(timer.window(elapsed)))
            log.write(step, values, samples_seen)
            say(_log_line(step, total_steps, values))
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            window_start, window_samples = time.time(), 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            _evaluate_and_log(engine, cfg, tokenizer, log, step, samples_seen)
        stopping = stop.any_rank()
        if stopping or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == total_steps:
            _save(engine, loader, cfg, step, samples_seen, task, {**layout, "step": step, "samples_seen": samples_seen,
                                                                 "total_steps": total_steps})
        if stopping:
            say(f"stop requested: saved step {step}; resume with train.resume=latest")
            progress.close()
            batches.close()
            return {"stopped_at": step}
    progress.close()
    # Stop the data workers now (the loader's `finally`), not whenever this process exits: an
    # orphaned worker would hold the launcher's output pipes open after the rank is gone.
    batches.close()

    final_metrics = _evaluate_and_log(engine, cfg, tokenizer, log, step, samples_seen)
    final_metrics.update({"steps": step, "samples_seen": samples_seen, "nonfinite_steps": nonfinite_total,
                          "skipped": data_stream.skip_counts(loader), "hardware": _hardware(engine, world_size),
                          "wall_time_s": round(time.time() - started, 1)})
    if resumed_at is not None:
        final_metrics["resumed_at_step"] = resumed_at  # wall_time_s counts from that (re)start
    _export(engine, cfg, tokenizer, output_dir)
    if rank == 0:
        (output_dir / "metrics.json").write_text(json.dumps(final_metrics, indent=2))
        plot = plot_history(log.records(), output_dir / "training.png")
        if "zeroshot/acc1" in final_metrics:
            say(f"zero-shot top-1 on {cfg.eval.zeroshot_shards}: {final_metrics['zeroshot/acc1']:.1%}")
        if "knn/acc1" in final_metrics:
            say(f"kNN top-1 on {cfg.eval.knn_test_shards} (neighbours {cfg.eval.knn_train_shards}): "
                f"{final_metrics['knn/acc1']:.1%}")
        if "linear_probe/acc1" in final_metrics:
            say(f"linear-probe top-1 on {cfg.eval.knn_test_shards}: {final_metrics['linear_probe/acc1']:.1%}")
        say(f"done: metrics {output_dir / 'metrics.json'}, plot {plot}, model {output_dir / 'model'}, "
            f"checkpoints {output_dir / 'checkpoints'}, TensorBoard logs {output_dir / 'tensorboard'}")
        if cfg.push_to_hub is not None:
            from mmcl.export import push_after_training

            say(f"pushed to the Hub: {push_after_training(cfg, output_dir)}")
    return final_metrics


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


def _hardware(engine, world_size: int) -> dict[str, Any]:
    """Device, world size and precision of the run, for metrics.json and the model card."""
    import platform

    if torch.cuda.is_available():
        device = f"{world_size} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"{world_size} CPU ranks on {_cpu_name() or platform.machine()} ({os.cpu_count()} cores)"
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"device": device, "world_size": world_size, "precision": precision,
            "zero_stage": engine.zero_optimization_stage()}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _monitor_config(output_dir: Path) -> dict[str, Any]:
    return {
        "tensorboard": {"enabled": True, "output_path": str(output_dir / "tensorboard"), "job_name": "train"},
        "csv_monitor": {"enabled": True, "output_path": str(output_dir / "csv"), "job_name": "train"},
    }


def _save(engine, loader, cfg: RunConfig, step: int, samples_seen: int, task: TrainingTask,
          layout: dict[str, Any]) -> None:
    client_state = {"step": step, "samples_seen": samples_seen}
    rank_state = {"data": loader.state_dict(), "rng": capture_rng()}
    path = save_checkpoint(engine, cfg.output_dir, step, client_state, rank_state, cfg.train.keep_checkpoints,
                           task_state=task.extra_state(), layout=layout)
    say(f"checkpoint {path}")


def _check_resume_layout(cfg: RunConfig, output_dir: Path, world_size: int, ds_config: dict[str, Any]):
    """(checkpoint or None, this launch's layout, the checkpoint's layout or None, changes) -- before any
    process group, so a changed global batch without train.allow_batch_change stops every rank at once."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or str(world_size)  # torchrun / deepspeed
    layout = elastic.current_layout(cfg, world_size, int(local), stage)
    found = resolve_resume(cfg.train.resume, output_dir) if cfg.train.resume is not None else None
    if found is None:
        return None, layout, None, []
    saved = elastic.saved_layout(found[0] / found[1])
    return found, layout, saved, elastic.compare(saved, layout, cfg.train.allow_batch_change)


def _resume_elastic(engine, loader, task: TrainingTask, cfg: RunConfig, root: Path, tag: str,
                    saved_layout: dict[str, Any], changes: list[str]) -> tuple[int, int]:
    """Resume `root/tag` written with another layout; returns (step, samples seen). See engine/elastic.py."""
    rank, world_size = get_rank(), get_world_size()
    stage = engine.zero_optimization_stage()
    repartitioned = saved_layout["world_size"] != world_size or saved_layout.get("zero_stage", stage) != stage
    if repartitioned:
        client_state = elastic.load_universal(engine, root, tag)
    else:
        _, client_state = engine.load_checkpoint(str(root), tag=tag)
    step, samples_seen = client_state["step"], client_state["samples_seen"]
    task.load_extra_state(load_task_state(root, tag))  # the same tensors on every rank, whatever the world size
    states = elastic.all_rank_states(root / tag)
    same_stream = (len(states) == world_size and states[0]["data"]["num_workers"] == max(1, cfg.data.num_workers)
                   and states[0]["data"]["batch_size"] == cfg.train.micro_batch_size)
    if same_stream:  # e.g. only the node count changed: the data stream continues exactly
        loader.load_state_dict(states[rank]["data"])
        data = {"segment": -1}
    else:
        data = loader.load_elastic_state([s["data"] for s in states])
    if len(states) == world_size:
        restore_rng(states[rank]["rng"])
    else:
        elastic.reseed(cfg.seed, step, rank)
    model = ("model and optimizer re-partitioned through a DeepSpeed universal checkpoint (fp32 weights and Adam "
             "moments as saved)" if repartitioned else "model and optimizer loaded as saved")
    if data["segment"] == -1:
        stream = "the data stream continues exactly"
    elif data["segment"] == 0:
        stream = f"data starts epoch {data['epoch']} split over the new ranks x workers"
    elif cfg.data.resampled:
        stream = (f"resampled data: the {data['remaining_batches']} remaining batches per rank of epoch {data['epoch']} are "
                  "drawn by the new consumers' own seeded generators (deterministic, not the old consumers' draws)")
    else:
        stream = (f"the samples of epoch {data['epoch']} no rank consumed yet are split over the new ranks x workers and "
                  f"each is seen once in its remaining {data['remaining_batches']} batches per rank")
    say(f"elastic resume from {root / tag} at step {step}: {', '.join(changes)}; {model}; {stream}; "
        f"step, schedule, logit scale and momentum/queue state continue; "
        f"{'RNG streams re-seeded per rank' if len(states) != world_size else 'RNG states restored'} "
        "(losses are not bit-identical to an uninterrupted run)")
    return step, samples_seen


def _debug_key_log(rank: int):
    """MMCL_DEBUG_DIR set (tests, debugging): each rank appends every step's sample keys to
    keys_rank{rank}.jsonl there."""
    folder = os.environ.get("MMCL_DEBUG_DIR")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"keys_rank{rank}.jsonl", "a")


def _debug_after_resume(engine) -> None:
    """MMCL_DEBUG_DIR set: the engine's state right after a resume is saved there as DeepSpeed checkpoint
    `after_resume`, to compare it with the checkpoint it was loaded from."""
    folder = os.environ.get("MMCL_DEBUG_DIR")
    if folder:
        engine.save_checkpoint(folder, tag="after_resume", save_latest=False)


def _gatherer(engine):
    """params -> context in which ZeRO-3-partitioned parameters are whole (read-only); a no-op below stage 3."""
    if engine.zero_optimization_stage() != 3:
        from mmcl.engine.objectives import no_gather

        return no_gather
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of every scalar metric (accuracies, per-rank losses)."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[name].detach().float().cpu().reshape(()) for name in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return {name: float(value) for name, value in zip(names, stacked)}


def _log_line(step: int, total: int, values: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}"]
    objectives = [k for k in values if k in KNOWN_OBJECTIVES]
    if len(objectives) > 1:
        parts += [f"{k} {values[k]:.4f}" for k in objectives]
    parts += [f"{k} {v:.3f}" for k, v in values.items() if k.endswith("_acc")]
    if "logit_scale" in values:
        parts.append(f"scale {values['logit_scale']:.2f}")
    parts.append(f"{values['samples_per_s']:.1f} samples/s")
    if "time/window_s" in values:
        parts.append(f"data {values['time/data_s']:.2f}s ({values['time/data_wait_fraction']:.0%}) "
                     f"fwd+bwd {values['time/forward_backward_s']:.2f}s opt {values['time/optimizer_s']:.2f}s "
                     f"peak {values['memory/peak_gb']:.2f} GB")
    skipped = sum(v for k, v in values.items() if k.startswith("skipped/"))
    if skipped:
        parts.append(f"skipped {int(skipped)}")
    return " | ".join(parts)


def _progress_bar(total: int, done: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)


def _evaluate_and_log(engine, cfg: RunConfig, tokenizer, log: MetricsLog, step: int, samples_seen: int) -> dict[str, Any]:
    from mmcl.engine.periodic_eval import evaluate

    results = evaluate(engine, cfg, tokenizer)
    if results:
        log.write(step, {k: v for k, v in results.items() if isinstance(v, (int, float))}, samples_seen)
        say("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


def _export(engine, cfg: RunConfig, tokenizer, output_dir: Path) -> None:
    """Write the mmcl model folder (config.yaml + model.safetensors + tokenizer) from any ZeRO stage."""
    from mmcl.engine.periodic_eval import full_parameters
    from mmcl.evaluation.loading import save_model_dir

    with full_parameters(engine):
        if get_rank() == 0:
            save_model_dir(engine.module.model, cfg, tokenizer, output_dir / "model")
    if dist.is_initialized():
        dist.barrier()
