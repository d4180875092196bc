"""Run a function on W CPU ranks joined by a gloo process group; collect their results.

The ranks are forked from the test process, not spawned: a spawned rank imports torch, mmcl and
the test module again (seconds each, two ranks at a time on a 2-core machine); a forked one
starts with them. Each rank sets one intra-op thread before any torch op (as DataLoader workers do).

The function must be importable (a module-level function) and return a dict of tensors;
each rank saves it to a temp dir that the parent loads after all ranks exit.
"""

from __future__ import annotations

import atexit
import os
import socket
import tempfile
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcl.distributed import note_joined, run_command


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    # A forked rank inherits the parent's atexit handlers (the finalizers of its temporary
    # folders, out_dir's among them); run_command runs them at exit, so drop them first.
    atexit._clear()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    note_joined()

    def work() -> None:
        try:
            torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()

    # Ends through os._exit: a gloo thread still releasing tensors in interpreter teardown
    # would abort the rank after its result is saved (pytorch#179291; see run_command).
    run_command(work)


def run_on_gloo_ranks(fn: Callable, world_size: int, *args) -> list[dict[str, torch.Tensor]]:
    """Call fn(rank, world_size, *args) on `world_size` spawned processes; return per-rank dicts."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children: the CI box has 2 cores
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(_rank_entry, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size,
                               join=True, start_method="fork")
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def assert_ranks_equal_concatenated(ranks: list[dict], ref: dict, global_batch: int, tol: float) -> None:
    """The local-loss form over W ranks equals one process over the concatenated batch: the mean
    loss, each rank's feature gradients (rank r's loss is the mean over its rows: W * dL/dx_r),
    and the logit scale's gradient averaged over ranks (data-parallel averaging)."""
    world = len(ranks)
    assert abs(torch.stack([r["loss"] for r in ranks]).mean().item() - ref["loss"].item()) < tol
    local = global_batch // world
    for rank, result in enumerate(ranks):
        rows = slice(rank * local, (rank + 1) * local)
        for key in ("image_grad", "text_grad"):
            assert (result[key] / world - ref[key][rows]).abs().max() < tol, (rank, key)
    scale_grad = torch.stack([r["scale_grad"] for r in ranks]).mean()
    assert abs(scale_grad.item() - ref["scale_grad"].item()) < tol
