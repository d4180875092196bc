"""Package names imported on first use, so importing a package (or its torch-free settings) loads no torch.

    _LAZY = {"build_model": "mmcl.models.dual_encoder", ...}
    __getattr__, __dir__ = lazy_names(__name__, _LAZY)
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, table: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level `__getattr__` and `__dir__` (PEP 562) for `package`: name -> the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[package], name, value)  # the next lookup is an ordinary attribute
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
