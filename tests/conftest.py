"""Markers for the two test lanes: `make test` runs everything, `make test-fast` skips `e2e` and `slow`.

- `e2e`: every test under tests/e2e/ (real `deepspeed` / `torchrun` launches), marked here, and a
  launch elsewhere, marked where it is written.
- `slow`: a test that starts a process group of several ranks, a fresh interpreter running mmcl, or
  otherwise takes many seconds; the tests that use a module's multi-rank fixture are marked here.

`make test` runs on two pytest-xdist workers (`-n 2 --dist loadgroup`): each file is one group, so
its module fixtures launch once, and the files that use one of the launching session fixtures in
`SHARED_LAUNCHES` share that fixture's group, so it launches once too.
"""
from __future__ import annotations

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent / "e2e"
# Module fixtures that spawn gloo ranks once for all the tests that use them.
MULTI_RANK_FIXTURES = {"ranks", "two_ranks"}
# Session fixtures that launch training runs (tests/e2e/conftest.py): their users run on one worker.
SHARED_LAUNCHES = ("zero_runs", "in_process_checks")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
        if MULTI_RANK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    by_file: dict[Path, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(Path(item.path), []).append(item)
    for path, tests in by_file.items():
        shared = [name for name in SHARED_LAUNCHES if any(name in getattr(t, "fixturenames", ()) for t in tests)]
        group = shared[0] if shared else str(path)
        for item in tests:
            item.add_marker(pytest.mark.xdist_group(group))
