"""Task lists of `mmcl benchmark`: which datasets to score, how, and by which main metric.

A task list is a YAML list of mappings (the built-in ones are `mmcl/evaluation/tasks/*.yaml`):

    - dataset: wds/vtab/caltech101      # as CLIP_benchmark names it
      task: zeroshot_classification     # | zeroshot_retrieval | linear_probe
      main_metric: mean_per_class_recall  # optional: acc1 (classification, probe) / mean_recall@1 (retrieval)
      name: Caltech-101                 # optional display name
      shots: 10                         # optional, linear_probe only: training images per class

A dataset is read from `<root>/wds_<name>/`, `<name>` being the dataset without its `wds/` prefix and
with '/' replaced by '-' (CLIP_benchmark's `dataset_cleaned`); DataComp's download folders
(`wds_<name>_test`) are found too. Imports neither torch nor the datasets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcl.evaluation.settings import BUILTIN_TASK_LISTS

TASK_KINDS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
# Tasks a built-in list names but mmcl does not score (listed as not scored, counted in the suite's M).
NOT_IMPLEMENTED = {"winogavil": "WinoGAViL's association task is not implemented"}
DEFAULT_MAIN_METRIC = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "mean_recall@1", "linear_probe": "acc1"}
TASKS_DIR = Path(__file__).with_name("tasks")
_KEYS = ("dataset", "task", "main_metric", "name", "shots")


class BenchmarkError(ValueError):
    """A user error of `mmcl benchmark`; the message is one sentence."""


@dataclass(frozen=True)
class Task:
    """One entry of a task list."""

    dataset: str  # CLIP_benchmark's name, e.g. wds/cifar10
    task: str  # one of TASK_KINDS, or a key of NOT_IMPLEMENTED
    main_metric: str  # the metric the table, the plot and the suite average report
    name: str  # display name (default: the dataset without wds/)
    shots: int | None = None  # linear_probe: training images per class (None: the whole train split)

    @property
    def short(self) -> str:
        """The dataset without CLIP_benchmark's `wds/` prefix (its `dataset_name`)."""
        return self.dataset[len("wds/"):] if self.dataset.startswith("wds/") else self.dataset

    @property
    def slug(self) -> str:
        """CLIP_benchmark's `dataset_slug` (name with '/' -> '_'), the stem of this task's result file."""
        return self.short.replace("/", "_")

    @property
    def key(self) -> str:
        """Unique within a list: '<slug>_<task>' (+ '_<shots>shot')."""
        return f"{self.slug}_{self.task}" + (f"_{self.shots}shot" if self.shots else "")

    @property
    def result_file(self) -> str:
        return f"{self.key}.json"

    def spec(self) -> dict[str, Any]:
        """The entry as written into a result JSON (what a rerun compares)."""
        return {"dataset": self.dataset, "task": self.task, "main_metric": self.main_metric, "shots": self.shots}


def builtin_task_lists() -> tuple[str, ...]:
    return BUILTIN_TASK_LISTS


def load_task_list(spec: str) -> tuple[str, list[Task]]:
    """(list name, tasks) of a built-in list (`datacomp`, `clip_benchmark`) or a YAML file."""
    import yaml

    if spec in BUILTIN_TASK_LISTS:
        path, label = TASKS_DIR / f"{spec}.yaml", spec
    else:
        path, label = Path(spec).expanduser(), str(spec)
        if not path.is_file():
            raise BenchmarkError(f"--tasks '{spec}' is neither a built-in task list ({', '.join(BUILTIN_TASK_LISTS)}) "
                                 "nor a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise BenchmarkError(f"task list {label} cannot be read as YAML ({type(error).__name__}).") from None
    if not isinstance(raw, list) or not raw:
        raise BenchmarkError(f"task list {label} must be a non-empty YAML list of mappings with 'dataset' and 'task'.")
    tasks = [_task(entry, i, label) for i, entry in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if task.key in seen:
            raise BenchmarkError(f"task list {label}: entries {seen[task.key] + 1} and {i + 1} are the same task "
                                 f"({task.dataset}, {task.task}); keep one.")
        seen[task.key] = i
    return Path(label).stem if label not in BUILTIN_TASK_LISTS else label, tasks


def _task(entry: Any, index: int, label: str) -> Task:
    where = f"task list {label}, entry {index + 1}"
    if not isinstance(entry, dict):
        raise BenchmarkError(f"{where} is not a mapping; give dataset: and task: keys.")
    unknown = [k for k in entry if k not in _KEYS]
    if unknown:
        raise BenchmarkError(f"{where} has the unknown key '{unknown[0]}'; the keys are {', '.join(_KEYS)}.")
    dataset, task = entry.get("dataset"), entry.get("task")
    if not isinstance(dataset, str) or not dataset.strip("/ "):
        raise BenchmarkError(f"{where} needs 'dataset' (a CLIP_benchmark name such as wds/cifar10).")
    if task not in TASK_KINDS and task not in NOT_IMPLEMENTED:
        raise BenchmarkError(f"{where} ({dataset}): 'task' must be one of {', '.join(TASK_KINDS)}, got {task!r}.")
    shots = entry.get("shots")
    if shots is not None and (task != "linear_probe" or not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
        raise BenchmarkError(f"{where} ({dataset}): 'shots' is a positive integer, and only for linear_probe.")
    main_metric = entry.get("main_metric") or DEFAULT_MAIN_METRIC.get(task, "acc1")
    if not isinstance(main_metric, str):
        raise BenchmarkError(f"{where} ({dataset}): 'main_metric' must be a metric name such as acc1.")
    name = entry.get("name") or (dataset[len("wds/"):] if dataset.startswith("wds/") else dataset)
    return Task(dataset=dataset, task=task, main_metric=main_metric, name=str(name), shots=shots)


def dataset_folder(root: str | Path, task: Task) -> Path | None:
    """The folder that holds `task`'s dataset under `root`, or None when it is not there.

    Tried in order: wds_<name> (CLIP_benchmark's dataset_cleaned, '/' -> '-'), wds_<name>_test
    (DataComp's downloads), and <name> itself (mmcl's own shard folders).
    """
    cleaned = task.short.replace("/", "-")
    for candidate in (f"wds_{cleaned}", f"wds_{cleaned}_test", cleaned):
        folder = Path(root) / candidate
        if folder.is_dir() and ((folder / "test").is_dir() or any(folder.glob("*.tar"))):
            return folder
    return None
