"""Where a log window's wall time went: waiting for data, forward+backward, the optimizer step; peak memory.

OpenCLIP logs `data_time` / `batch_time` per step; this is the same idea per log window,
split one level further, so a stalled input pipeline (data fraction near 1) or a slow
optimizer (ZeRO offload, a huge Adam state) shows in `metrics.jsonl`, the log line and
TensorBoard without a profiler.

    timer = StepTimer(device)
    with timer.phase("data"): batches = ...
    with timer.phase("forward_backward"): ...       # the step functions nest "optimizer" inside it
    values = timer.window(elapsed)                  # seconds summed over the window's steps; resets

Phases nest: time inside a nested phase counts for the inner one only, so the parts add up
to the window's wall time less what no phase covers (logging, evaluation, checkpoints).
CUDA work is asynchronous: each phase boundary synchronises the device so a phase is
charged for its own kernels (a few microseconds per boundary, three boundaries per step).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("data", "forward_backward", "optimizer")


class StepTimer:
    """Accumulates seconds per phase over one log window (see the module docstring)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._stack: list[str] = []
        self._since = 0.0
        reset_peak_memory(self.cuda)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside this block to `name` (minus nested phases)."""
        self._switch(push=name)
        try:
            yield
        finally:
            self._switch(push=None)

    def _switch(self, push: str | None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        if push is None:
            self._stack.pop()
        else:
            self._stack.append(push)
        self._since = now

    def window(self, wall_seconds: float) -> dict[str, float]:
        """This rank's window: `<phase>_s` seconds, `data_wait_fraction` of `wall_seconds`, `peak_memory_gb`.

        Resets the sums and the memory peak for the next window.
        """
        values = {f"time/{name}_s": seconds for name, seconds in self.seconds.items()}
        values["time/window_s"] = wall_seconds
        values["time/data_wait_fraction"] = self.seconds["data"] / max(wall_seconds, 1e-9)
        values["memory/peak_gb"] = peak_memory_bytes(self.cuda) / 2**30
        self.seconds = dict.fromkeys(PHASES, 0.0)
        reset_peak_memory(self.cuda)
        return values


def reduce_window(values: dict[str, float]) -> dict[str, float]:
    """Across ranks: seconds averaged, the data-wait fraction that of the averages, the memory peak
    the largest rank's."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    names = sorted(values)
    stacked = torch.tensor([values[name] for name in names], dtype=torch.float64)
    peaks = stacked.clone()
    dist.all_reduce(stacked)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    reduced = {name: float(peaks[i] if name.startswith("memory/") else stacked[i] / world) for i, name in enumerate(names)}
    reduced["time/data_wait_fraction"] = reduced["time/data_s"] / max(reduced["time/window_s"], 1e-9)
    return reduced


def peak_memory_bytes(cuda: bool) -> int:
    """CUDA: the most memory allocated by tensors since the last reset. CPU: this process's peak
    resident set (VmHWM) since the last reset, or since it started where resetting is not possible."""
    if cuda:
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak_memory(cuda: bool) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's VmHWM (writing 5 to clear_refs)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole run
        pass
