"""The training loop under DeepSpeed, top to bottom.

    run = set_up(cfg, ...)      # checks, model + objectives, process group, data, engine (setup.py)
    resume(run)                 # from a checkpoint, exactly or elastically (resume.py)
    loop(run)                   # per step: batches -> forward/backward -> optimizer step ->
                                #   after-step updates (EMA) -> log / evaluate / checkpoint
    finish(run)                 # final evaluation, model folder, metrics, plot, Hub push

One step, from the loop to the loss and back: `plain_backward` (steps.py) or
`feature_cache_backward` (feature_cache.py) calls `engine(batch)` (task.py: encode, then
each objective in mmcl/objectives/ calls its loss in mmcl/losses/) and `engine.backward`;
`optimizer_step` makes the accumulation boundary's `engine.step()`.
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

from mmcl.config import RunConfig
from mmcl.engine import training_data
from mmcl.engine.checkpoint import save_checkpoint
from mmcl.engine.feature_cache import feature_cache_backward
from mmcl.engine.metrics_log import MetricsLog, TrainingLog, plot_history
from mmcl.engine.resume import resume
from mmcl.engine.rng import capture_rng
from mmcl.engine.run import Run
from mmcl.engine.runtime import move_batch, say
from mmcl.engine.setup import set_up
from mmcl.engine.steps import optimizer_step, plain_backward
from mmcl.engine.zero import full_parameters, gatherer
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
    run = set_up(cfg, ds_user_config, ds_source)
    resume(run)
    log = TrainingLog(run)
    try:
        if not loop(run, log):
            log.finish_tracker()
            return {"stopped_at": run.step}
    finally:
        log.close()
    return finish(run, log)


def loop(run: Run, log: TrainingLog) -> bool:
    """Train from `run.step` to `run.total_steps`; False when a stop was requested (saved, resumable)."""
    cfg, engine, task = run.cfg, run.engine, run.task
    backward = feature_cache_backward if run.feature_cache else plain_backward
    stop = StopRequested()
    gather = gatherer(engine)
    patch_dropout = _announce_patch_dropout(run)
    key_log = _debug_key_log(run.rank)
    batches = training_data.endless(run.loader)
    try:
        while run.step < run.total_steps:
            with log.timer.phase("data"):
                micro_batches = [move_batch(next(batches), engine) for _ in range(cfg.train.grad_accum_steps)]
            if patch_dropout:  # a function of the step alone, so a resumed run switches at the same step
                set_patch_dropout(task, patch_dropout_active(run.step, run.total_steps, cfg.train.patch_dropout_final_steps))
            if key_log is not None:
                key_log.write(json.dumps({"step": run.step + 1, "keys": [k for b in micro_batches for k in b["keys"]]}) + "\n")
                key_log.flush()
            with log.timer.phase("forward_backward"):
                accumulated = backward(engine, task, micro_batches)
            with log.timer.phase("optimizer"):
                stepped = optimizer_step(engine, accumulated)
            run.step += 1
            step_batch = _step_global_batch(micro_batches, run.world_size)
            run.samples_seen += step_batch
            metrics = accumulated.metrics
            if stepped:  # per-step updates of the objectives (the momentum copies' EMA)
                metrics.update({k: torch.tensor(v) for k, v in task.after_optimizer_step(run.step, run.total_steps, gather).items()})
            log.step(metrics, accumulated.nonfinite, patch_dropout, step_batch, _sequence_length(micro_batches, run))
            if cfg.train.eval_every and run.step % cfg.train.eval_every == 0 and run.step < run.total_steps:
                _evaluate_and_log(run, log.metrics)
            stopping = stop.any_rank()
            if stopping or (cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0) or run.step == run.total_steps:
                _save(run)
            if stopping:
                say(f"stop requested: saved step {run.step}; resume with train.resume=latest")
                return False
    finally:
        # Stop the data workers now (the loader's `finally`), not whenever this process exits: an
        # orphaned worker would hold the launcher's output pipes open after the rank is gone.
        batches.close()
    return True


def _step_global_batch(micro_batches: list[dict[str, Any]], world_size: int) -> int:
    """Samples in the step over every rank: this rank's micro-batches x the world size. Every rank has the
    same micro-batch sizes at a step (fixed, or with data.naflex.token_budget set by the step's sequence
    length, which all ranks draw alike), so no collective is needed."""
    return sum(len(batch["keys"]) for batch in micro_batches) * world_size


def _sequence_length(micro_batches: list[dict[str, Any]], run: Run) -> int | None:
    """The step's NaFlex sequence length when data.naflex draws one per step, else None."""
    naflex = run.cfg.data.naflex
    if naflex is None or (naflex.sequence_lengths is None and naflex.token_budget is None):
        return None
    return int(micro_batches[0]["pixel_values"].shape[1])


def finish(run: Run, log: TrainingLog) -> dict[str, Any]:
    """Final evaluation, the model folder, metrics.json, the plot and the Hub push; returns the metrics."""
    cfg, output_dir = run.cfg, run.output_dir
    final_metrics = _evaluate_and_log(run, log.metrics)
    final_metrics.update({"steps": run.step, "samples_seen": run.samples_seen, "nonfinite_steps": log.nonfinite_total,
                          "skipped": training_data.skip_counts(run.loader), "hardware": _hardware(run.engine, run.world_size),
                          "wall_time_s": round(time.time() - run.started, 1)})
    if run.loader.cfg.selection is not None:
        final_metrics["unselected"] = run.loader.unselected_samples(all_ranks=True)
    if run.resumed_at is not None:
        final_metrics["resumed_at_step"] = run.resumed_at  # wall_time_s counts from that (re)start
    _export(run)
    if run.rank == 0:
        (output_dir / "metrics.json").write_text(json.dumps(final_metrics, indent=2))
        plot = plot_history(log.metrics.records(), output_dir / "training.png")
        log.finish_tracker(plot)
        _say_results(cfg, final_metrics)
        say(f"done: metrics {output_dir / 'metrics.json'}, plot {plot}, model {output_dir / 'model'}, "
            f"checkpoints {output_dir / 'checkpoints'}, TensorBoard logs {output_dir / 'tensorboard'}")
        if cfg.push_to_hub is not None:
            from mmcl.export import push_after_training

            say(f"pushed to the Hub: {push_after_training(cfg, output_dir)}")
    return final_metrics


def _announce_patch_dropout(run: Run) -> list:
    """The image tower's patch-dropout hooks (empty without patch dropout), after saying when they act."""
    hooks = patch_dropout_hooks(run.task)
    if hooks:
        unmasked_from = max(run.total_steps - run.cfg.train.patch_dropout_final_steps, 0)
        say(f"patch dropout {run.cfg.model.image.patch_dropout}: steps 1-{unmasked_from} drop patch tokens"
            + (f", steps {unmasked_from + 1}-{run.total_steps} see every token" if unmasked_from < run.total_steps else ""))
    return hooks


def _say_results(cfg: RunConfig, metrics: dict[str, Any]) -> None:
    if "zeroshot/acc1" in metrics:
        say(f"zero-shot top-1 on {cfg.eval.zeroshot_shards}: {metrics['zeroshot/acc1']:.1%}")
    if "knn/acc1" in metrics:
        say(f"kNN top-1 on {cfg.eval.knn_test_shards} (neighbours {cfg.eval.knn_train_shards}): {metrics['knn/acc1']:.1%}")
    if "linear_probe/acc1" in metrics:
        say(f"linear-probe top-1 on {cfg.eval.knn_test_shards}: {metrics['linear_probe/acc1']:.1%}")


def _save(run: Run) -> None:
    """A checkpoint of step `run.step`: the engine, the objectives' state, each rank's data position and RNGs."""
    client_state = {"step": run.step, "samples_seen": run.samples_seen}
    rank_state = {"data": run.loader.state_dict(), "rng": capture_rng()}
    layout = {**run.layout, "step": run.step, "samples_seen": run.samples_seen, "total_steps": run.total_steps}
    path = save_checkpoint(run.engine, run.cfg.output_dir, run.step, client_state, rank_state, run.cfg.train.keep_checkpoints,
                           task_state=run.task.extra_state(), layout=layout)
    say(f"checkpoint {path}")


def _evaluate_and_log(run: Run, metrics_log: MetricsLog) -> dict[str, Any]:
    from mmcl.engine.periodic_eval import evaluate

    results = evaluate(run.engine, run.cfg, run.tokenizer)
    if results:
        metrics_log.write(run.step, {k: v for k, v in results.items() if isinstance(v, (int, float))}, run.samples_seen)
        say("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


def _export(run: Run) -> None:
    """Write the mmcl model folder (config.yaml + model.safetensors + tokenizer) from any ZeRO stage."""
    from mmcl.model_dir import MODEL_DIR, save_model_dir

    with full_parameters(run.engine):
        if run.rank == 0:
            save_model_dir(run.engine.module.model, run.cfg, run.tokenizer, run.output_dir / MODEL_DIR)
    if dist.is_initialized():
        dist.barrier()


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


def _debug_key_log(rank: int):
    """MMCL_DEBUG_DIR set (tests, debugging): each rank appends every step's sample keys to
    keys_rank{rank}.jsonl there."""
    folder = os.environ.get("MMCL_DEBUG_DIR")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(Path(folder) / f"keys_rank{rank}.jsonl", "a")
