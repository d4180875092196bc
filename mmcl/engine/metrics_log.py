"""Where training metrics go: DeepSpeed's monitor (TensorBoard, CSV), metrics.jsonl, the console, a plot.

Only rank 0 writes. Values are reduced across ranks by the caller before they get here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir: str | Path, engine=None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.monitor = getattr(engine, "monitor", None) if engine is not None else None
        self.started = time.time()

    def write(self, step: int, values: dict[str, float], samples: int) -> None:
        """One record: JSON line, monitor events named `train/<key>` (x axis = optimizer step)."""
        if not self.enabled:
            return
        record = {"step": step, "samples": samples, "time": round(time.time() - self.started, 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
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
