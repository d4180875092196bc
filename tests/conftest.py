"""Markers for the two test lanes: `make test` runs everything, `make test-fast` skips `e2e` and `slow`.

- `e2e`: every test under tests/e2e/ (real `deepspeed` / `torchrun` launches), marked here, and a
  launch elsewhere, marked where it is written.
- `slow`: a test that starts a process group of several ranks, a fresh interpreter running mmcl, or
  otherwise takes many seconds; the tests that use a module's multi-rank fixture are marked here.

`make test` runs on two pytest-xdist workers (`-n 2 --dist loadfile`): a file's tests run on one
worker, so its module fixtures launch once. (xdist 3.8's `loadgroup`, which could also keep the users
of one session fixture together, does not group under pytest 9: it renames `item._nodeid`, which
pytest 9 no longer has.) A session fixture is built once per worker that uses it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent / "e2e"
# Module fixtures that spawn gloo ranks once for all the tests that use them.
MULTI_RANK_FIXTURES = {"ranks", "two_ranks"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
        if MULTI_RANK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
