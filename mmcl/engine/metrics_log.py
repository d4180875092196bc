"""Where training metrics go: DeepSpeed's monitor (TensorBoard, CSV), metrics.jsonl, W&B (log.wandb), the console, a plot.

`TrainingLog` is the loop's side: per step it counts samples and non-finite losses, and every
`train.log_every` steps it reduces the metrics over ranks and writes one record and one console
line. Only rank 0 writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mmcl.distributed import get_world_size
from mmcl.engine.runtime import TrainingError, say
from mmcl.engine.step_timer import StepTimer, reduce_window

if TYPE_CHECKING:
    from mmcl.engine.run import Run


class MetricsLog:
    def __init__(self, output_dir: str | Path, engine=None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.monitor = getattr(engine, "monitor", None) if engine is not None else None
        self.started = time.time()
        self.tracker = None  # mmcl.engine.tracking.WandbTracker when log.wandb is set (rank 0)

    def write(self, step: int, values: dict[str, float], samples: int) -> None:
        """One record: JSON line, monitor events named `train/<key>` (x axis = optimizer step)."""
        if not self.enabled:
            return
        record = {"step": step, "samples": samples, "time": round(time.time() - self.started, 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events([(f"train/{key}", float(value), step) for key, value in values.items()])

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run that was killed after its last checkpoint)."""
        if self.enabled and self.path.is_file():
            kept = [r for r in self.records() if r["step"] <= step]
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text("".join(json.dumps(r) + "\n" for r in kept))
            temporary.replace(self.path)

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class TrainingLog:
    """The loop's metrics: the metrics log, the console line, the progress bar, the step timer."""

    def __init__(self, run: Run):
        self.run = run
        self.metrics = MetricsLog(run.output_dir, run.engine, enabled=run.rank == 0)
        logged = self.metrics.records()  # a killed launch's may go past run.step (what W&B then holds)
        self.metrics.truncate_after(run.step)
        if run.rank == 0:
            from mmcl.engine.tracking import tracker_for_run

            self.metrics.tracker = tracker_for_run(run, logged, self.metrics.records())
        self.timer = StepTimer(run.engine.device)  # data / forward+backward / optimizer seconds per log window
        self.progress = _progress_bar(run.total_steps, run.step, run.rank)
        self.nonfinite_total, self.nonfinite_in_row = 0, 0
        self.window_start, self.window_samples = time.time(), 0
        self.global_batch, self.sequence_length = run.global_batch, None

    def step(self, metrics: dict[str, torch.Tensor] | None, nonfinite: int, patch_dropout: list,
             global_batch: int | None = None, sequence_length: int | None = None) -> None:
        """After step `run.step`: count it, stop after too many non-finite losses in a row, log every log_every steps.
        global_batch: the step's samples over all ranks (default: micro x accumulation x world size);
        sequence_length: its NaFlex sequence length, when drawn per step."""
        run, train = self.run, self.run.cfg.train
        self.global_batch = run.global_batch if global_batch is None else global_batch
        self.sequence_length = sequence_length
        self.window_samples += self.global_batch
        self.nonfinite_total += nonfinite
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if metrics is None else 0
        if self.nonfinite_in_row >= train.max_nonfinite_steps:
            raise TrainingError(f"the loss was non-finite for {self.nonfinite_in_row} steps in a row (step {run.step}); "
                                "lower optim.lr or check the data.")
        self.progress.update(1)
        if metrics is not None and (run.step % train.log_every == 0 or run.step == run.total_steps):
            self._write(metrics, patch_dropout)

    def _write(self, metrics: dict[str, torch.Tensor], patch_dropout: list) -> None:
        run = self.run
        elapsed = time.time() - self.window_start
        values = _reduce_metrics(metrics)
        values.update({f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups if "name" in g})
        values["samples_per_s"] = self.window_samples / max(elapsed, 1e-9)
        values["samples_per_s_per_rank"] = values["samples_per_s"] / run.world_size
        values["global_batch"] = self.global_batch  # the logged step's samples over all ranks
        if self.sequence_length is not None:
            values["sequence_length"] = self.sequence_length
        values["grad_norm"] = float(run.engine.get_global_grad_norm() or 0.0)
        values["nonfinite_steps"] = self.nonfinite_total
        if patch_dropout:  # tokens per image the image tower's layers saw in the last training forward
            values["image_tokens"] = patch_dropout[0].tokens_out
        values.update({f"skipped/{k}": v for k, v in run.loader.skip_counts(all_ranks=True).items()})
        if run.loader.cfg.selection is not None:  # not bad data: samples the selection does not deliver
            values["unselected"] = run.loader.unselected_samples(all_ranks=True)
        values.update(reduce_window(self.timer.window(elapsed)))
        self.metrics.write(run.step, values, run.samples_seen)
        say(_log_line(run.step, run.total_steps, values, run.task.weights))
        self.progress.set_postfix(loss=f"{values['loss']:.4f}")
        self.window_start, self.window_samples = time.time(), 0

    def close(self) -> None:
        self.progress.close()

    def finish_tracker(self, plot: Path | None = None) -> None:
        """End the W&B run (when there is one), with the training plot at the last step."""
        if self.metrics.tracker is not None:
            self.metrics.tracker.finish(plot, self.run.step)
            self.metrics.tracker = None


def _reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of every scalar metric (accuracies, per-rank losses)."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[name].detach().float().cpu().reshape(()) for name in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return {name: float(value) for name, value in zip(names, stacked)}


def _log_line(step: int, total: int, values: dict[str, float], weights: dict[str, float]) -> str:
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}"]
    objectives = [k for k in values if k in weights]
    if len(objectives) > 1:
        parts += [f"{k} {values[k]:.4f}" for k in objectives]
    parts += [f"{k} {v:.3f}" for k, v in values.items() if k.endswith("_acc")]
    if "logit_scale" in values:
        parts.append(f"scale {values['logit_scale']:.2f}")
    if "sequence_length" in values:
        parts.append(f"length {values['sequence_length']}")
    if "global_batch" in values:
        parts.append(f"batch {values['global_batch']}")
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


ACCURACIES = {"zeroshot/acc1": ("zero-shot top-1", "tab:orange"), "knn/acc1": ("kNN top-1", "tab:green"),
              "linear_probe/acc1": ("linear-probe top-1", "tab:red")}


def plot_history(records: list[dict], out_path: str | Path) -> Path | None:
    """PNG with the loss (left axis) and the evaluation top-1 accuracies (right axis) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    accuracies = {key: [(r["step"], r[key]) for r in records if key in r] for key in ACCURACIES}
    accuracies = {key: points for key, points in accuracies.items() if points}
    if not losses:
        return None
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(*zip(*losses), color="tab:blue", label="loss")
    left.set_xlabel("step")
    left.set_ylabel("loss", color="tab:blue")
    if accuracies:
        right = left.twinx()
        for key, points in accuracies.items():
            label, color = ACCURACIES[key]
            right.plot(*zip(*points), color=color, marker="o", label=label)
        right.set_ylabel("top-1" if len(accuracies) > 1 else ACCURACIES[next(iter(accuracies))][0])
        right.set_ylim(0, 1)
        if len(accuracies) > 1:
            right.legend(loc="center right")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return Path(out_path)
