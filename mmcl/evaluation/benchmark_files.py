"""The files of an `mmcl benchmark` output folder: the marker, result files, atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmcl.evaluation.benchmark_tasks import Task

MANIFEST = "mmcl_benchmark.json"  # written first: marks the folder as an mmcl benchmark output


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("command") == "benchmark" else None


def read_result(out: Path, task: Task) -> dict | None:
    """The result JSON of `task` in `out`, or None (absent or unreadable)."""
    try:
        result = json.loads((out / task.result_file).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("metrics"), dict) else None
