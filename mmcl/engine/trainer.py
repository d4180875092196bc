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
from mmcl.engine.checkpoint import (capture_rng, load_rank_state, load_task_state, resolve_resume, restore_rng,
                                    save_checkpoint)
from mmcl.engine.ds_config import build_deepspeed_config
from mmcl.engine.metrics_log import MetricsLog, plot_history
from mmcl.engine.objectives import loss_chunk_size
from mmcl.engine.optim import lr_lambda, parameter_groups
from mmcl.engine.runtime import (TrainingError, check_output_dir, init_process_group, move_batch,
                                 say)
from mmcl.engine.steps import feature_cache_step, plain_step
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model, build_tokenizer


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
    model = build_model(cfg.model)
    launch_world_size = int(os.environ.get("WORLD_SIZE", "1"))  # the process group does not exist yet
    chunk_size = loss_chunk_size(cfg, launch_world_size)
    task = TrainingTask(model, cfg.objectives, chunk_size, cfg)

    # Checked before the process group exists, so a contradiction stops every rank at once.
    ds_config = build_deepspeed_config(cfg, launch_world_size, ds_user_config, ds_source)
    ds_config.update(_monitor_config(output_dir))
    init_process_group()
    rank, world_size = get_rank(), get_world_size()
    if chunk_size is not None and task.uses_logit_scale:
        say(f"contrastive loss: tiled exact, {chunk_size}-row tiles (loss.chunk_size={cfg.loss.chunk_size})")
    loader = data_stream.build(cfg, tokenizer, rank, world_size, teacher=task.teacher_inputs())
    total_steps = cfg.train.steps or cfg.train.epochs * data_stream.steps_per_epoch(loader, cfg, world_size)
    if total_steps < 1:
        raise TrainingError("the run has 0 steps: the data is smaller than one global batch; lower train.micro_batch_size.")

    groups = parameter_groups(task, cfg.optim, prefix="model.")  # towers by name; SSL heads with the heads
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    step, samples_seen = 0, 0
    if cfg.train.resume is not None:
        found = resolve_resume(cfg.train.resume, output_dir)
        if found is not None:
            root, tag = found
            _, client_state = engine.load_checkpoint(str(root), tag=tag)
            step, samples_seen = client_state["step"], client_state["samples_seen"]
            task.load_extra_state(load_task_state(root, tag))
            rank_state = load_rank_state(root, tag)
            loader.load_state_dict(rank_state["data"])
            restore_rng(rank_state["rng"])
            say(f"resumed from {root / tag} at step {step}")

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
    batches = data_stream.endless(loader)
    final_metrics: dict[str, Any] = {}

    while step < total_steps:
        micro_batches = [move_batch(next(batches), engine) for _ in range(cfg.train.grad_accum_steps)]
        metrics, nonfinite = (feature_cache_step if use_cache else plain_step)(engine, micro_batches)
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
            values.update({f"skipped/{k}": v for k, v in data_stream.skip_counts(loader).items()})
            log.write(step, values, samples_seen)
            say(_log_line(step, total_steps, values))
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            window_start, window_samples = time.time(), 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
            _evaluate_and_log(engine, cfg, tokenizer, log, step, samples_seen)
        stopping = stop.any_rank()
        if stopping or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or step == total_steps:
            _save(engine, loader, cfg, step, samples_seen, task)
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
                          "skipped": data_stream.skip_counts(loader)})
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


def _monitor_config(output_dir: Path) -> dict[str, Any]:
    return {
        "tensorboard": {"enabled": True, "output_path": str(output_dir / "tensorboard"), "job_name": "train"},
        "csv_monitor": {"enabled": True, "output_path": str(output_dir / "csv"), "job_name": "train"},
    }


def _save(engine, loader, cfg: RunConfig, step: int, samples_seen: int, task: TrainingTask) -> None:
    client_state = {"step": step, "samples_seen": samples_seen}
    rank_state = {"data": loader.state_dict(), "rng": capture_rng()}
    path = save_checkpoint(engine, cfg.output_dir, step, client_state, rank_state, cfg.train.keep_checkpoints,
                           task_state=task.extra_state())
    say(f"checkpoint {path}")


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
