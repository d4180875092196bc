"""The `eval` section of a run config: held-out evaluation during and after training.

Field comments document the keys (README's configuration reference is generated from them).
Imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmcl.coerce import ConfigError, check_path, count, positive

BUILTIN_TASK_LISTS = ("datacomp", "clip_benchmark")  # mmcl/evaluation/tasks/<name>.yaml (`mmcl benchmark --tasks`)


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training."""

    zeroshot_shards: str | None = None  # shards with .cls labels
    classnames: str | list[str] | None = None  # class names: an inline list, or a file (one per line, or JSON)
    templates: str | list[str] | None = None  # prompt templates with {}: an inline list, or a file (one per line, or JSON)
    retrieval_shards: str | None = None  # shards with captions
    knn_train_shards: str | None = None  # labelled (.cls) shards whose image features are the kNN neighbours
    knn_test_shards: str | None = None  # labelled shards classified by kNN (and the linear probe)
    knn_k: int = count(20)  # neighbours that vote
    knn_temperature: float = positive(0.07)  # vote weight exp(cos / T)
    linear_probe: bool = False  # also fit a logistic-regression probe on the kNN train features
    batch_size: int = count(256)  # images per evaluation batch
    benchmark: str | None = None  # a task list run every train.eval_every steps, logged as benchmark/<dataset>: datacomp, clip_benchmark, or a YAML file (docs/guides/benchmark.md)
    benchmark_root: str | None = None  # folder holding the task list's datasets (wds_<name>/test/*.tar, as `mmcl benchmark --root`); tasks missing there are skipped

    def validate(self, key: str, source: str) -> None:
        for name in ("classnames", "templates"):
            value = getattr(self, name)
            if isinstance(value, str):
                check_path(value, f"{key}.{name}", source, hub_id_allowed=False)
            elif isinstance(value, list) and not value:
                raise ConfigError(f"{source}: '{key}.{name}' is an empty list; give at least one entry or leave it unset.")
        if (self.knn_train_shards is None) != (self.knn_test_shards is None):
            raise ConfigError(f"{source}: '{key}.knn_train_shards' and '{key}.knn_test_shards' go together; set both or neither.")
        if (self.benchmark is None) != (self.benchmark_root is None):
            raise ConfigError(f"{source}: '{key}.benchmark' and '{key}.benchmark_root' go together; set both or neither.")
        if self.benchmark is not None:
            if self.benchmark not in BUILTIN_TASK_LISTS:
                check_path(self.benchmark, f"{key}.benchmark", source, hub_id_allowed=False)
            check_path(self.benchmark_root, f"{key}.benchmark_root", source, hub_id_allowed=False)
        if self.linear_probe and self.knn_train_shards is None:
            raise ConfigError(f"{source}: '{key}.linear_probe' needs '{key}.knn_train_shards' and '{key}.knn_test_shards'.")


def entries(value: str | list[str] | None, what: str) -> list[str] | dict[str, list[str]] | None:
    """`eval.classnames` / `eval.templates` as given inline, or read from its file; None when unset."""
    if value is None or isinstance(value, list):
        return value
    from mmcl.evaluation.prompts import read_list_file

    return read_list_file(value, what)
