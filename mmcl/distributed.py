"""Rank/world helpers, all-gather collectives for contrastive losses, and how a process that
joined a process group exits (`run_command`).

Every helper is safe to call without a process group: it then behaves as a single
process (rank 0 of a world of 1) and the gathers return their input unchanged.

Gradient convention of `all_gather_with_grad`: the backward SUMS the incoming gradient
over ranks and hands each rank its own slice. If every rank r computes a loss L_r from the
gathered tensor, rank r therefore receives d(sum_s L_s)/dx_r. With per-rank losses whose
mean is the global loss L (the local-loss form used in `mmcl.losses`), that is
W * dL/dx_r, and the data-parallel engine's AVERAGE over ranks (DDP, DeepSpeed) turns it
into exactly dL/dtheta for the parameters.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

_joined = False  # this process has joined a process group (see `run_command`)


def is_distributed() -> bool:
    """True when a default process group is initialised (even one of world size 1)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of ranks in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def note_joined() -> None:
    """Record that this process joined a process group, so `run_command` ends it with `os._exit`."""
    global _joined
    _joined = True


def print_redacted_traceback(kind, value, tb) -> None:
    """`sys.excepthook` that redacts credentials (a shard URL in an exception's message)."""
    from mmcl.redact import redact

    print(redact("".join(traceback.format_exception(kind, value, tb))), end="", file=sys.stderr, flush=True)


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """Run a command-line entry point and exit with its status (the `__main__` and console-script path).

    A process that joined a process group joins its threads, runs its atexit handlers (logging,
    multiprocessing children, temporary folders), flushes and leaves through `os._exit`,
    skipping the rest of the interpreter's teardown. The reason: gloo's worker threads release
    a collective's tensors only after the collective has completed, and that takes the GIL.
    When a rank's main thread reaches teardown first, Python ends such a thread mid-destructor
    and the rank aborts with "terminate called without an active exception" (SIGABRT) after a
    run that succeeded (pytorch/pytorch#179291; about 1 in 10 launches of the two-rank ZeRO
    1/2/3 test here). `destroy_process_group()` does not stop it: DeepSpeed still holds the
    group, so its threads live on. An exception that escapes `main` prints its traceback
    (credentials redacted, `mmcl.redact`) and exits 1, as Python would.
    """
    sys.excepthook = print_redacted_traceback
    try:
        status = main()
    except SystemExit as exit:
        status = exit.code
    except BaseException:
        if not _joined:
            raise
        print_redacted_traceback(*sys.exc_info())
        status = 1
    if not _joined:
        raise SystemExit(status)
    if isinstance(status, str):  # SystemExit("message"): Python prints it and exits 1
        print(status, file=sys.stderr)
        status = 1
    # What teardown runs first, in its order, while the interpreter is still whole: join the
    # non-daemon threads (and stop idle executor workers), then the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
            pass
    os._exit(status or 0)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient.

    x: [B, ...], the same shape on every rank. Returns [W*B, ...], rank r's rows at
    [r*B:(r+1)*B]; detached. Returns `x` itself when the world size is 1.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: all-reduce (SUM), keep own slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.local_rows = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        # Every rank's loss may depend on our rows, so our gradient is the sum of all ranks'
        # gradients w.r.t. the gathered tensor. all_reduce rather than reduce_scatter
        # because gloo (the CPU backend) has no reduce_scatter.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0, keeping the gradient path to every rank.

    x: [B, ...], the same shape on every rank (unequal batches are not supported).
    Returns [W*B, ...] with rank r's rows at [r*B:(r+1)*B]. Backward: the gradient w.r.t.
    the gathered tensor is summed over ranks and rank r receives rows [r*B:(r+1)*B] of that
    sum, i.e. d(sum_s L_s)/dx_r where L_s is rank s's loss (see the module docstring for
    why data-parallel averaging then gives the single-process gradient).
    Returns `x` itself when the world size is 1.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """Forward: all-reduce (SUM). Backward: all-reduce (SUM) of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        # Every rank's loss depends on the sum, hence on our addend with weight 1.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum of `x` over ranks, with the gradient path to every rank.

    x: any shape, the same on every rank. Returns the sum (same shape). Backward: rank r
    receives d(sum_s L_s)/dx_r, the same convention as `all_gather_with_grad`. Returns `x`
    itself when the world size is 1.
    """
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)
