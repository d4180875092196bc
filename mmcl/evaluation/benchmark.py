"""`mmcl benchmark`: a task list scored in one command, sharded over ranks, resumable.

    out/mmcl_benchmark.json        what wrote the folder (the marker that makes it mmcl's: see check_out)
    out/<dataset_slug>_<task>.json one per task, CLIP_benchmark's format: {"dataset", "model", "pretrained",
                                   "task", "metrics", "language"} + "mmcl": {main_metric, model_sha256, task,
                                   num_samples, skipped, seconds}
    out/results.md, results.csv    the main metric per task and the suite average over the tasks present
    out/results.png                the same as a bar chart

Under `deepspeed` / `torchrun` every rank runs every task on its share of the images (the features are
gathered in dataset order, so the figures equal one process's); rank 0 writes. A task whose result file
exists for the same weights and the same task entry is not run again, so a killed run is finished by
rerunning the same command. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcl.evaluation.benchmark_files import MANIFEST, atomic_write, read_manifest, read_result
from mmcl.evaluation.benchmark_tasks import NOT_IMPLEMENTED, BenchmarkError, Task, dataset_folder, load_task_list


@dataclass
class Plan:
    """What a benchmark run does with each task of its list (the same on every rank)."""

    tasks: list[Task]
    folders: dict[str, str] = field(default_factory=dict)  # task key -> dataset folder (tasks present locally)
    done: list[str] = field(default_factory=list)  # task keys with a matching result file
    missing: list[str] = field(default_factory=list)  # task keys whose dataset is not under --root
    not_scored: dict[str, str] = field(default_factory=dict)  # task key -> why mmcl does not score it

    @property
    def to_run(self) -> list[Task]:
        skip = set(self.done) | set(self.missing) | set(self.not_scored)
        return [t for t in self.tasks if t.key not in skip]


def check_out(out: str | Path) -> None:
    """Refuse an --out that is a file, or a non-empty folder `mmcl benchmark` did not write."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BenchmarkError(f"--out '{out}' is a file; pass a folder (new, empty, or an earlier `mmcl benchmark` output).")
    if path.is_dir() and any(path.iterdir()) and read_manifest(path) is None:
        raise BenchmarkError(f"--out '{out}' is a non-empty folder that mmcl benchmark did not write ({MANIFEST} "
                             "missing); pass a new or empty folder.")


def check_inputs(tasks: str, root: str | Path, out: str | Path) -> tuple[str, list[Task]]:
    """The cheap checks, before torch or a model loads: (list name, tasks)."""
    name, task_list = load_task_list(tasks)
    if not Path(root).is_dir():
        raise BenchmarkError(f"--root '{root}' is not a folder; pass the folder that holds the wds_<dataset> folders.")
    check_out(out)
    return name, task_list


def make_plan(tasks: list[Task], root: str | Path, out: Path, fingerprint: str) -> Plan:
    plan = Plan(tasks)
    for task in tasks:
        if task.task in NOT_IMPLEMENTED:
            plan.not_scored[task.key] = NOT_IMPLEMENTED[task.task]
            continue
        folder = dataset_folder(root, task)
        if folder is None:
            plan.missing.append(task.key)
            continue
        plan.folders[task.key] = str(folder)
        result = read_result(out, task)
        info = (result or {}).get("mmcl", {})
        if result is not None and info.get("model_sha256") == fingerprint and info.get("task") == task.spec():
            plan.done.append(task.key)
    return plan


def _shared_plan(plan: Plan | None) -> Plan:
    """Rank 0's plan on every rank (the ranks must run the same tasks in the same order)."""
    from mmcl.distributed import get_rank, get_world_size

    if get_world_size() == 1:
        return plan
    import torch.distributed as dist

    box = [plan if get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_benchmark(model_spec: str, root: str, tasks: str, out: str, batch_size: int = 64, workers: int = 2,
                  device: str | None = None, weights: str | None = None, openclip_config: str | None = None) -> dict:
    """Score every task of the list `tasks` present under `root`; returns the summary (see benchmark_report)."""
    from mmcl.distributed import get_rank, get_world_size
    from mmcl.evaluation.benchmark_data import read_folder
    from mmcl.evaluation.benchmark_eval import evaluate_task
    from mmcl.evaluation.benchmark_model import load_benchmark_model
    from mmcl.evaluation.benchmark_report import write_report
    from mmcl.evaluation.running import setup_distributed
    from mmcl.redact import redact, redact_tree

    if batch_size < 1 or workers < 0:
        raise BenchmarkError(f"--batch-size must be at least 1 and --workers 0 or more, got {batch_size} and {workers}.")
    list_name, task_list = check_inputs(tasks, root, out)
    out_dir = Path(out)
    torch_device = setup_distributed(device)
    model, fingerprint = load_benchmark_model(model_spec, torch_device, weights, openclip_config)
    leader = get_rank() == 0
    plan = _shared_plan(make_plan(task_list, root, out_dir, fingerprint) if leader else None)
    if leader:
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(".*.tmp*"):  # a write a kill interrupted (atomic_write's names)
            if leftover.is_file() and leftover.name.rsplit(".tmp", 1)[-1].isdigit():
                leftover.unlink()
        atomic_write(out_dir / MANIFEST, json.dumps({"command": "benchmark", "version": 1, "model": redact(model_spec),
                                                     "model_sha256": fingerprint, "tasks": list_name}, indent=2) + "\n")
        _say(f"benchmark {list_name}: {len(task_list) - len(plan.missing) - len(plan.not_scored)} of {len(task_list)} "
             f"tasks present under {root}; {len(plan.done)} already done, {len(plan.to_run)} to run over "
             f"{get_world_size()} rank(s)")
        if plan.missing:
            _say(f"not present locally (skipped): {', '.join(t.dataset for t in task_list if t.key in plan.missing)}")
        for key, why in plan.not_scored.items():
            _say(f"not scored: {key} ({why})")
    failed: dict[str, str] = {}
    todo = plan.to_run
    for number, task in enumerate(todo, 1):
        start = time.perf_counter()
        try:
            metrics, extra = evaluate_task(task, read_folder(plan.folders[task.key]), model, batch_size, workers)
        except (ValueError, FileNotFoundError) as error:  # this dataset cannot serve the task: say so, go on
            failed[task.key] = redact(str(error))
            if leader:
                _say(f"[{number}/{len(todo)}] {task.dataset} {task.task}: not scored: {failed[task.key]}")
            continue
        seconds = time.perf_counter() - start
        if leader:
            result = {"dataset": task.dataset, "model": model.name, "pretrained": redact(model.pretrained),
                      "task": task.task, "metrics": metrics, "language": "en",
                      "mmcl": {"main_metric": task.main_metric, "name": task.name, "model_sha256": fingerprint,
                               "task": task.spec(), **redact_tree(extra), "seconds": round(seconds, 3)}}
            atomic_write(out_dir / task.result_file, json.dumps(result, indent=2) + "\n")
            value = metrics.get(task.main_metric)
            shown = f"{task.main_metric} = {value:.4f}" if isinstance(value, float) else f"{task.main_metric}: not computed"
            _say(f"[{number}/{len(todo)}] {task.dataset} {task.task}: {shown} "
                 f"({extra.get('num_samples', extra.get('num_test'))} images, {seconds:.1f} s)")
    summary = {"ran": [t.key for t in todo if t.key not in failed], "done": plan.done, "missing": plan.missing,
               "failed": failed, "not_scored": plan.not_scored}
    if leader:
        summary.update(write_report(out_dir, list_name, task_list, model.name, plan, failed))
        _say(f"average {summary['average_text']}; wrote {out_dir / 'results.md'}, results.csv, results.png")
    return summary


def _say(line: str) -> None:
    print(line, flush=True)
