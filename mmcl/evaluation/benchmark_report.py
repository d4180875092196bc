"""The suite table (Markdown, CSV), the plot, and `mmcl benchmark compare`.

The suite average is the mean main metric over the tasks that have one (present locally and scored),
reported as "over N of M tasks", M being the whole task list; DataComp's own average is the N = M = 38 case.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcl.evaluation.benchmark_files import atomic_write, read_manifest, read_result
from mmcl.evaluation.benchmark_tasks import BenchmarkError, Task

if TYPE_CHECKING:
    from mmcl.evaluation.benchmark import Plan


def task_rows(out_dir: Path, tasks: list[Task], plan: Plan, failed: dict[str, str]) -> list[dict[str, Any]]:
    """One row per task of the list: name, dataset, task, main_metric, value (None if none), status."""
    rows = []
    for task in tasks:
        row = {"name": task.name, "dataset": task.dataset, "task": task.task + (f" ({task.shots}-shot)" if task.shots else ""),
               "main_metric": task.main_metric, "value": None}
        if task.key in plan.not_scored:
            row["status"] = f"not scored: {plan.not_scored[task.key]}"
        elif task.key in plan.missing:
            row["status"] = "not present locally"
        elif task.key in failed:
            row["status"] = f"not scored: {failed[task.key]}"
        else:
            result = read_result(out_dir, task)
            value = (result or {}).get("metrics", {}).get(task.main_metric)
            if isinstance(value, (int, float)) and value == value:  # NaN: CLIP_benchmark's acc5 below 5 classes
                row["value"], row["status"] = float(value), "scored"
            else:
                row["status"] = f"{task.main_metric} not computed (needs data mmcl does not read)"
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]]) -> tuple[float | None, int, int, str]:
    """(average, N scored, M listed, "0.4321 over N of M tasks")."""
    values = [r["value"] for r in rows if r["value"] is not None]
    average = sum(values) / len(values) if values else None
    text = (f"{average:.4f}" if average is not None else "n/a") + f" over {len(values)} of {len(rows)} tasks"
    return average, len(values), len(rows), text


def write_report(out_dir: Path, list_name: str, tasks: list[Task], model_name: str, plan: Plan,
                 failed: dict[str, str]) -> dict[str, Any]:
    """Write results.md, results.csv and results.png; returns {"average", "present", "total", "average_text", "rows"}."""
    rows = task_rows(out_dir, tasks, plan, failed)
    average, scored, total, text = summarise(rows)
    lines = [f"# {model_name} on {list_name}", "", f"Average main metric: **{text}**.", "",
             "| task | dataset | type | main metric | value | status |", "|---|---|---|---|---:|---|"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else ""
        lines.append(f"| {r['name']} | {r['dataset']} | {r['task']} | {r['main_metric']} | {value} | {r['status']} |")
    lines.append(f"| **average** | | | | **{average:.4f}** | {scored} of {total} tasks |" if average is not None
                 else f"| **average** | | | | | 0 of {total} tasks |")
    atomic_write(out_dir / "results.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "dataset", "task", "main_metric", "value", "status"])
    for r in rows:
        writer.writerow([r["name"], r["dataset"], r["task"], r["main_metric"],
                         "" if r["value"] is None else repr(r["value"]), r["status"]])
    writer.writerow(["average", "", "", "", "" if average is None else repr(average), f"{scored} of {total} tasks"])
    atomic_write(out_dir / "results.csv", buffer.getvalue())
    atomic_write(out_dir / "results.png", plot(rows, f"{model_name} on {list_name}: average {text}"))
    return {"average": average, "present": scored, "total": total, "average_text": text, "rows": rows}


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """A horizontal bar chart (PNG bytes) of the scored tasks' main metrics and their average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["value"] is not None]
    labels = [f"{r['name']} ({r['main_metric']})" for r in scored]
    values = [r["value"] for r in scored]
    figure, axes = plt.subplots(figsize=(7, 1.2 + 0.3 * max(len(scored), 1)))
    axes.barh(range(len(values)), values, color="tab:blue")
    for y, value in enumerate(values):
        axes.text(value + 0.01, y, f"{value:.3f}", va="center", fontsize=7)
    axes.set_yticks(range(len(values)), labels, fontsize=8)
    axes.invert_yaxis()
    if values:
        axes.axvline(sum(values) / len(values), color="tab:red", linestyle="--", label="average")
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes.set_xlim(0, 1.12)
    axes.set_xlabel("main metric")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")  # long task names stay whole
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- compare


def read_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{task key: {"name", "main_metric", "value"}} of the result files in an `mmcl benchmark` output folder."""
    path = Path(folder)
    if not path.is_dir() or read_manifest(path) is None:
        raise BenchmarkError(f"'{folder}' is not an `mmcl benchmark` output folder (no mmcl_benchmark.json).")
    results = {}
    for file in sorted(path.glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        info = data.get("mmcl") if isinstance(data, dict) else None
        if not isinstance(info, dict) or "main_metric" not in info or not isinstance(data.get("metrics"), dict):
            continue
        value = data["metrics"].get(info["main_metric"])
        results[file.stem] = {"name": info.get("name", data.get("dataset")), "main_metric": info["main_metric"],
                              "value": float(value) if isinstance(value, (int, float)) and value == value else None}
    return results


def compare(folders: list[str]) -> str:
    """A table: each task's main metric in the first folder and, for every other folder, its value and the delta."""
    if len(folders) < 2:
        raise BenchmarkError("mmcl benchmark compare needs at least two output folders.")
    tables = [read_results(f) for f in folders]
    keys = list(tables[0]) + [k for t in tables[1:] for k in t if k not in tables[0]]
    keys = list(dict.fromkeys(keys))
    header = ["task", "metric", "A"] + [f"{chr(66 + i)} (delta)" for i in range(len(folders) - 1)]
    body = []
    for key in keys:
        first = tables[0].get(key, {}).get("value")
        some = next(t[key] for t in tables if key in t)
        row = [some["name"], some["main_metric"], _fmt(first)]
        for table in tables[1:]:
            value = table.get(key, {}).get("value")
            delta = f" ({value - first:+.4f})" if value is not None and first is not None else ""
            row.append(_fmt(value) + delta)
        body.append(row)
    common = [k for k in keys if all(t.get(k, {}).get("value") is not None for t in tables)]
    averages = [sum(t[k]["value"] for k in common) / len(common) if common else None for t in tables]
    last = ["average", f"{len(common)} common tasks", _fmt(averages[0])]
    last += [_fmt(a) + (f" ({a - averages[0]:+.4f})" if a is not None and averages[0] is not None else "") for a in averages[1:]]
    body.append(last)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    legend = [f"{chr(65 + i)} = {f}" for i, f in enumerate(folders)]
    lines = legend + ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"
