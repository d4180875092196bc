"""DeepSpeed checkpoints loaded without unpickling arbitrary objects.

A DeepSpeed checkpoint is a set of pickles, and DeepSpeed's loaders (`engine.load_checkpoint`
through its TorchCheckpointEngine, `zero_to_fp32`, `ds_to_universal`, the universal loader) all
call `torch.load(weights_only=False)`: a crafted `mp_rank_00_model_states.pt` would run its
payload on load. Two guards, both on by default:

- `check_pickles(folder)` reads the pickle opcodes of every `*.pt` in a checkpoint folder (nothing
  is executed) and refuses, in one sentence naming the file, any global outside torch's
  weights-only set and the few types DeepSpeed itself stores (`DEEPSPEED_TYPES`). It runs before
  any model or process group.
- `restricted_unpickling()` runs a block with torch's own `TORCH_FORCE_WEIGHTS_ONLY_LOAD` switch on
  and those types allowed (`torch.serialization.safe_globals`): every `torch.load` in the block,
  DeepSpeed's included, uses the weights-only unpickler, which never imports or calls anything else.

`trust=True` (train.trust_checkpoint / `mmcl export --trust-checkpoint`) turns both off, for a
checkpoint the user wrote and knows holds other objects.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_FORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# What DeepSpeed 0.19 pickles besides tensors and containers (ZeRO 0-3, bf16/fp16 optimizers).
DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds a pickled object that mmcl will not unpickle; the message is one sentence."""


def deepspeed_types() -> list[type]:
    """The classes named in DEEPSPEED_TYPES."""
    import importlib

    classes = []
    for name in DEEPSPEED_TYPES:
        module, _, attribute = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attribute))
    return classes


def _refusal(what: str, name: str, trust_hint: str, error: type[Exception] = UnsafeCheckpoint) -> Exception:
    return error(
        f"{what} holds a pickled '{name}', which is neither a tensor nor one of DeepSpeed's own types, and unpickling "
        f"it could run code, so mmcl does not load it; use only checkpoints you or mmcl wrote ({trust_hint} "
        "only if you trust its author)."
    )


def unsafe_globals(path: Path, allowed: tuple[str, ...] = DEEPSPEED_TYPES) -> list[str]:
    """The globals a torch.save file references beyond torch's weights-only set and `allowed`.

    Reads the pickle opcodes only. Raises ValueError for a file that is not a readable torch zip
    archive (torch and DeepSpeed write nothing else).
    """
    if not zipfile.is_zipfile(path):
        raise ValueError("not a torch zip archive")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as failure:
        raise ValueError(str(failure).splitlines()[0][:100] if str(failure) else type(failure).__name__) from None
    return [name for name in found if name not in allowed]


def check_pickles(folder: Path, trust_hint: str, trust: bool = False, error: type[Exception] = UnsafeCheckpoint) -> None:
    """Raise `error` (one sentence) for the first `*.pt` under `folder` that is unreadable or references
    a global outside the allowed set (see `unsafe_globals`); nothing is unpickled. trust_hint: how the
    user says they trust it (e.g. 'set train.trust_checkpoint=true')."""
    if trust:
        return
    for path in sorted(folder.rglob("*.pt")):
        try:
            names = unsafe_globals(path)
        except ValueError as failure:
            raise error(f"{path} is not a readable torch file ({failure}); the checkpoint is damaged or was "
                        "not written by torch.save.") from None
        if names:
            raise _refusal(str(path), names[0], trust_hint, error)


def weights_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a weights file that loads without unpickling objects, as the end of a
    sentence about it ('does not exist', 'is not a regular file', 'is empty', 'holds a pickled ...');
    None when it can be tried. Reads headers and pickle opcodes only."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as failure:  # safetensors raises its own SafetensorError for a bad header
            return f"is not a readable safetensors file ({str(failure).splitlines()[0][:100]})"
        return None
    if not zipfile.is_zipfile(path):
        return None  # a legacy torch file: torch's weights-only unpickler decides when it is loaded
    try:
        names = unsafe_globals(path, allowed=())
    except ValueError as failure:
        return f"is not a readable torch file ({failure})"
    if names:
        return f"holds a pickled '{names[0]}', not only tensors, and unpickling it could run code"
    return None


@contextlib.contextmanager
def restricted_unpickling(what: str, trust_hint: str, trust: bool = False,
                          error: type[Exception] = UnsafeCheckpoint) -> Iterator[None]:
    """Within the block, every torch.load is weights-only with DEEPSPEED_TYPES allowed; a refused
    file raises `error` (one sentence) naming `what` (the checkpoint) and the global it referenced."""
    if trust:
        yield
        return
    saved = {key: os.environ.get(key) for key in (FORCE, NO_FORCE)}
    os.environ[FORCE] = "1"
    os.environ.pop(NO_FORCE, None)  # both set is an error in torch
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            yield
    except pickle.UnpicklingError as refused:
        match = re.search(r"GLOBAL ([\w.]+)", str(refused))
        raise _refusal(what, match.group(1) if match else "object", trust_hint, error) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
