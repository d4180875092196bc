"""Process-level plumbing for the trainer: process group, devices, rank-0 printing, fast checks."""
from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from mmcl.distributed import get_rank, note_joined
from mmcl.redact import redact


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message is one sentence for the user."""


def say(message: str) -> None:
    """Print on rank 0 only (other ranks stay quiet so output is not duplicated); credentials redacted."""
    if get_rank() == 0:
        print(f"[mmcl] {redact(message)}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group() -> None:
    """One process group for `deepspeed`, `torchrun` and plain `python` launches.

    CUDA + NCCL when GPUs are present, gloo (with DeepSpeed's CPU accelerator) otherwise. A
    plain `python train.py` gets a world of one on a free loopback port.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        deepspeed.init_distributed(dist_backend="gloo")
    note_joined()


def enable_stack_dumps() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack of that rank to its stderr.

    The tool for a run that hangs (a collective one rank never reached, a stuck data worker):
    signal every rank and compare where each one waits. DataLoader workers forked later
    inherit the handler. The run continues afterwards.
    """
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return
    # Called in-process (a notebook, pytest's capture) sys.stderr may have no file
    # descriptor; the interpreter's original stderr then still does.
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
            return
        except (AttributeError, OSError, ValueError):
            continue


def select_accelerator() -> None:
    """Tell DeepSpeed to use its CPU accelerator when there is no GPU (before it is imported)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def check_output_dir(output_dir: Path) -> None:
    """The output directory must be creatable and writable (checked on every rank, before any work)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"output_dir '{output_dir}' is not writable ({error.strerror or error}); choose another output_dir.") from error


def move_batch(batch: dict, engine) -> dict:
    """Tensors (also inside lists, e.g. the SSL `views`) to the engine's device; images to its compute dtype
    (stored teacher features, `teacher_*_features_<t>`, stay float32: they are targets, not tower inputs)."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None

    def move(value, cast: bool = True):
        if torch.is_tensor(value):
            value = value.to(engine.device, non_blocking=True)
            if cast and dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        elif isinstance(value, list) and value and all(torch.is_tensor(item) for item in value):
            value = [move(item) for item in value]
        return value

    return {key: move(value, not (key.startswith("teacher_") and "_features_" in key)) for key, value in batch.items()}


def exit_with_error(error: BaseException) -> None:
    print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
    raise SystemExit(2)
