"""Plain data (parsed YAML) -> typed config dataclasses, with one-sentence errors.

`build(cls, raw, key, source)` checks every key of `raw` against the dataclass `cls` (unknown
keys get a close-match suggestion), coerces each value to its annotation, checks the bounds
and paths declared in field metadata, builds nested sections recursively, and finally calls
the section's own `validate(key, source)` (its cross-field rules), when it has one.

Field helpers (used by every config section, beside the code it configures):

    micro_batch_size: int = count(32)                    # >= 1
    lr: float = positive(5e-4)                           # > 0
    flip_p: float = probability(0.5)                     # in [0, 1]
    betas: list[float] = bounded([0.9, 0.98], 0, 1, high_open=True)   # each item in [0, 1)
    tokenizer: str | None = field(default=None, metadata=MODEL_PATH)  # local path or hub id

Every number must also be finite. This module imports neither torch nor transformers.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

PATH = {"path": True}  # field metadata: the value is a local path that must exist
MODEL_PATH = {"model_path": True}  # field metadata: a local path that must exist, or a hub id


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one sentence."""


# ----------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Bounds:
    """The range a number (or each number of a list) must lie in; None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # appended to the error, e.g. "(0 = MoCo v3, no queue)"

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """'>= 1', 'positive', 'in [0, 1)', ..."""
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def bounded(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, note: str = "", **metadata: Any) -> Any:
    """A dataclass field whose value (each item, for a list) must lie within [low, high] (open ends
    as flagged); checked when the config is built. A list default is copied per instance."""
    bounds = Bounds(low, high, low_open, high_open, note)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"bounds": bounds, **metadata})
    return field(default=default, metadata={"bounds": bounds, **metadata})


def count(default: int | None, **metadata: Any) -> Any:
    """Sizes, steps, widths, periods: >= 1 (None stays allowed where the annotation allows it)."""
    return bounded(default, 1, **metadata)


def nonnegative(default: Any, note: str = "", **metadata: Any) -> Any:
    return bounded(default, 0, note=note, **metadata)


def positive(default: Any, **metadata: Any) -> Any:
    """Rates, temperatures, scales: > 0."""
    return bounded(default, 0, low_open=True, **metadata)


def probability(default: Any, **metadata: Any) -> Any:
    """Probabilities, fractions, momenta: in [0, 1]."""
    return bounded(default, 0, 1, **metadata)


def check_bounds(value: Any, bounds: Bounds, key: str, source: str) -> None:
    values = value if isinstance(value, list) else [value]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if all(bounds.holds(v) for v in numbers):
        return
    note = f" {bounds.note}" if bounds.note else ""
    if isinstance(value, list):
        what = "probabilities in [0, 1]" if (bounds.low, bounds.high) == (0, 1) else f"values {bounds.describe()}"
        raise ConfigError(f"{source}: '{key}' must be {what}{note}, got {value}.")
    raise ConfigError(f"{source}: '{key}' must be {bounds.describe()}{note}, got {_number(value)}.")


# ----------------------------------------------------------------------------- building


def build(cls: type, raw: Any, key: str, source: str) -> Any:
    """Validate `raw` against dataclass `cls` and construct it (recursively)."""
    where = key or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {describe_value(raw)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            suggestion = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" — did you mean '{join(key, suggestion[0])}'?" if suggestion else f" (known keys: {', '.join(fields)})."
            raise ConfigError(f"{source}: unknown key '{join(key, str(name))}'{hint}")
    values = {}
    for name, spec in fields.items():
        sub_key = join(key, name)
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{sub_key}'.")
            continue
        value = coerce(raw[name], hints[name], sub_key, source)
        if isinstance(value, str) and (spec.metadata.get("path") or spec.metadata.get("model_path")):
            check_path(value, sub_key, source, hub_id_allowed=bool(spec.metadata.get("model_path")))
        if value is not None and "bounds" in spec.metadata:
            check_bounds(value, spec.metadata["bounds"], sub_key, source)
        values[name] = value
    section = cls(**values)
    if hasattr(section, "validate"):
        section.validate(key, source)
    return section


def coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """`value` as `annotation` (unions, Literal, dict, list, bool, int, float, str, nested dataclasses)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return coerce(value, candidate, key, source)
            except ConfigError as error:
                errors.append(error)
        if len(candidates) == 1:
            raise errors[0]
        raise ConfigError(f"{source}: '{key}' must be {' or '.join(type_name(a) for a in args)}, got {describe_value(value)}.")
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, key, source)
    if origin is Literal:
        if value not in args:
            suggestion = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" — did you mean '{suggestion[0]}'?" if suggestion else "."
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {describe_value(value)}.")
        key_type, value_type = args or (Any, Any)
        return {
            coerce(k, key_type, f"{key} (key {k!r})", source): coerce(v, value_type, join(key, str(k)), source)
            for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {describe_value(value)}.")
        item_type = args[0] if args else Any
        return [coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {describe_value(value)}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {describe_value(value)}.")
        return value
    if annotation is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {describe_value(value)}.")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {describe_value(value)}.")
        return value
    raise TypeError(f"config field '{key}' has an unsupported annotation {annotation!r}")  # a bug in a config section


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def check_path(value: str, key: str, source: str, hub_id_allowed: bool) -> None:
    """A local path must exist; with `hub_id_allowed`, `org/name` or `name` may be a hub id instead."""
    if Path(value).expanduser().exists():
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value
    if hub_id_allowed and not looks_local and _HUB_ID.match(value):
        return
    raise ConfigError(f"{source}: '{key}' points to '{value}', which does not exist.")


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    if typing.get_origin(annotation) is list:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(annotation, str(annotation))


def describe_value(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


def _number(value: float | None) -> str:
    """1.0 -> '1', 0.5 -> '0.5' (as a user would write it)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
