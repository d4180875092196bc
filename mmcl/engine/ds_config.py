"""The DeepSpeed config: the user's JSON, filled from the run config, contradictions refused.

Batch sizes, precision and clipping come from one place, the run YAML (`train.*`,
`optim.grad_clip`). A DeepSpeed JSON may leave them out, say "auto", or repeat the same
values; a different value is a `DeepSpeedConfigError` naming both sides.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcl.config import RunConfig
from mmcl.engine import sizes


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON contradicts the run config or cannot be read."""


def read_deepspeed_json(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not Path(path).is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist.")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON ({error}).") from error


def build_deepspeed_config(cfg: RunConfig, world_size: int, user: dict[str, Any], source: str = "DeepSpeed config") -> dict[str, Any]:
    """Merge `user` (parsed JSON) with the run config; returns the dict for `deepspeed.initialize`."""
    ds = json.loads(json.dumps(user))  # deep copy
    train = cfg.train
    _agree(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size", source)
    _agree(ds, "gradient_accumulation_steps", train.grad_accum_steps, "train.grad_accum_steps", source)
    global_batch = sizes.global_batch(train.micro_batch_size, train.grad_accum_steps, world_size)
    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        raise DeepSpeedConfigError(
            f"train.global_batch_size is {train.global_batch_size} but micro_batch_size {train.micro_batch_size} × "
            f"grad_accum_steps {train.grad_accum_steps} × {world_size} ranks = {global_batch}; make them agree."
        )
    _agree(ds, "train_batch_size", global_batch, f"train.micro_batch_size × grad_accum_steps × {world_size} ranks", source)
    if cfg.optim.grad_clip is not None:
        _agree(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip", source)
    elif ds.get("gradient_clipping", 0) not in (0, 0.0, "auto"):
        raise DeepSpeedConfigError(f"{source} sets gradient_clipping but optim.grad_clip is null; set it in one place.")

    enabled = {name for name in ("bf16", "fp16") if ds.get(name, {}).get("enabled") in (True, "auto")}
    json_precision = enabled.pop() if len(enabled) == 1 else ("fp32" if not enabled else None)
    if json_precision is None:
        raise DeepSpeedConfigError(f"{source} enables both bf16 and fp16; pick one.")
    if train.precision is not None and json_precision != "fp32" and json_precision != train.precision:
        raise DeepSpeedConfigError(f"{source} enables {json_precision} but train.precision is {train.precision}; set it in one place.")
    precision = train.precision or json_precision
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        section["enabled"] = precision == name
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)

    zero = ds.setdefault("zero_optimization", {})
    if cfg.train.zero_stage is not None:
        _agree(zero, "stage", cfg.train.zero_stage, "train.zero_stage", source)
    zero.setdefault("stage", 2)
    if "optimizer" in ds or "scheduler" in ds:
        raise DeepSpeedConfigError(
            f"{source} defines an optimizer/scheduler; mmcl builds AdamW with parameter groups and the schedule from 'optim.*', so remove them."
        )
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW with our parameter groups
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _agree(ds: dict[str, Any], key: str, value: Any, yaml_key: str, source: str) -> None:
    if key in ds and ds[key] != "auto" and ds[key] != value:
        raise DeepSpeedConfigError(f"{source} sets {key}={ds[key]} but the run config gives {value} ({yaml_key}); set it in one place.")
    ds[key] = value
