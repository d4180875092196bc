"""Peak memory and time of the contrastive loss's forward + backward: mmcl vs OpenCLIP.

    python benchmarks/loss_memory.py                                   # every batch, both losses
    python benchmarks/loss_memory.py --batches 262144 --impls mmcl     # one configuration
    python benchmarks/loss_memory.py --report                          # table of collected results

One process, CPU, float32, d = 512, global batch B: `mmcl.losses.ClipLoss(chunk_size=chunk)`
(chunked, exact) against `open_clip.loss.ClipLoss()` (dense). Every (loss, batch) runs in
a fresh subprocess (`--worker`) so that its peak RSS is its own:

    loss peak = ru_maxrss after all repeats - VmRSS after imports and input creation,

i.e. what the loss's forward + backward adds on top of the process with both libraries
imported and the [B, 512] image/text features (plus logit scale) built; it includes the
feature gradients the backward leaves behind. Inputs are built without temporaries
(randn, then normalised in place), so nothing earlier raised the high-water mark.
Time: wall clock of forward + backward, median over repeats (3 up to 16k, 1 above).

OpenCLIP keeps several [B, B] float32 matrices (16.5 GB measured at 32k); it is run only
where that prediction fits the memory available at the time (with a margin), waiting
for other work on the machine to finish first when it would fit an idle machine, and
reported as skipped otherwise. Results are appended to a JSON-lines file, one line per
configuration, so long runs (128k, 256k) can go in the background and join the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM = 512
BATCHES = [4096, 16384, 32768, 65536, 131072, 262144]
IMPLS = ["mmcl", "openclip"]
RESULTS = Path(__file__).with_name("loss_memory_results.jsonl")
# OpenCLIP's measured peak at 32k (DESIGN.md), scaled by B^2 for the prediction.
OPENCLIP_BYTES_AT_32K = 16.5e9
MARGIN_BYTES = 4 * 2**30  # left free for the rest of the machine (32k then needs ~20.8 GB available)
GIB = 2**30


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def predicted_bytes(impl: str, batch: int) -> float:
    if impl == "openclip":
        return OPENCLIP_BYTES_AT_32K * (batch / 32768) ** 2
    return 4.0 * batch * DIM * 4 + 4 * 2048**2 * 4  # feature grads + accumulators + a few chunks


def repeats_for(batch: int) -> int:
    return 3 if batch <= 16384 else 1


def worker(impl: str, batch: int, repeats: int, chunk: int | None, threads: int) -> dict:
    """Runs in the fresh subprocess: build inputs, run forward + backward, report peak and times."""
    import torch
    from open_clip.loss import ClipLoss as OpenClipLoss

    from mmcl.losses import ClipLoss
    from mmcl.losses.chunked import DEFAULT_CHUNK

    chunk = chunk or DEFAULT_CHUNK

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, DIM, generator=g)
    txt = torch.randn(batch, DIM, generator=g)
    img.div_(img.norm(dim=1, keepdim=True))  # in place: no [B, D] temporary
    txt.div_(txt.norm(dim=1, keepdim=True)).add_(img).div_(2.0)  # correlated pairs, like a model's
    txt.div_(txt.norm(dim=1, keepdim=True))
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    if impl == "mmcl":
        module = ClipLoss(chunk_size=chunk)
        loss_fn = lambda: module(img, txt, scale)["loss"]  # noqa: E731
    elif impl == "mmcl-dense":
        module = ClipLoss()
        loss_fn = lambda: module(img, txt, scale)["loss"]  # noqa: E731
    else:
        module = OpenClipLoss()
        loss_fn = lambda: module(img, txt, scale)  # noqa: E731

    base_rss = _vm_rss_bytes()
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    times, values = [], []
    for _ in range(repeats):
        img.grad = txt.grad = scale.grad = None
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - start)
        values.append(loss.item())
        del loss
    peak_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl, "batch": batch, "dim": DIM, "status": "ok", "chunk": chunk if impl == "mmcl" else None,
        "threads": threads, "repeats": repeats, "times_s": times, "time_s": statistics.median(times),
        "loss": values[0], "scale_grad": scale.grad.item(),
        "base_rss_mb": base_rss / 2**20, "base_maxrss_mb": base_maxrss / 2**20,
        "peak_maxrss_mb": peak_maxrss / 2**20, "loss_peak_mb": (peak_maxrss - base_rss) / 2**20,
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_config(impl: str, batch: int, args) -> dict:
    """One configuration in a fresh subprocess, after checking (and waiting for) memory."""
    need = predicted_bytes(impl, batch)
    total = _meminfo_bytes("MemTotal")
    if need > total - MARGIN_BYTES:
        return {"impl": impl, "batch": batch, "status": "does not fit",
                "reason": f"predicted {need / GIB:.1f} GiB > {total / GIB:.1f} GiB RAM - {MARGIN_BYTES / GIB:.0f} GiB margin"}
    deadline = time.time() + args.wait_s
    while (available := _meminfo_bytes("MemAvailable")) - MARGIN_BYTES < need:
        if time.time() > deadline:
            return {"impl": impl, "batch": batch, "status": "skipped",
                    "reason": f"predicted {need / GIB:.1f} GiB, only {available / GIB:.1f} GiB available for {args.wait_s} s"}
        print(f"[{impl} {batch}] waiting: need {need / GIB:.1f} GiB + margin, {available / GIB:.1f} GiB available", flush=True)
        time.sleep(60)
    # The parent never imports torch: its own RSS would sit beside the measured process.
    cmd = [sys.executable, __file__, "--worker", impl, str(batch), "--repeats", str(args.repeats or repeats_for(batch)),
           "--threads", str(args.threads)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        return {"impl": impl, "batch": batch, "status": "failed",
                "reason": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_results(path: Path) -> dict[tuple[str, int], dict]:
    """The latest result per (impl, batch) in the JSON-lines file."""
    latest = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                latest[(r["impl"], r["batch"])] = r
    return latest


def table(results: dict[tuple[str, int], dict]) -> str:
    def cell(r, key, fmt):
        if r is None:
            return "-"
        return format(r[key], fmt) if r["status"] == "ok" else r["status"]

    lines = [
        "| batch | mmcl peak MB | openclip peak MB | memory ratio | mmcl s | openclip s | time ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in sorted({b for _, b in results}):
        ours, theirs = results.get(("mmcl", batch)), results.get(("openclip", batch))
        both = ours is not None and theirs is not None and ours["status"] == theirs["status"] == "ok"
        mem_ratio = f"{ours['loss_peak_mb'] / theirs['loss_peak_mb']:.3f}" if both else "-"
        time_ratio = f"{ours['time_s'] / theirs['time_s']:.2f}" if both else "-"
        lines.append(
            f"| {batch // 1024}k | {cell(ours, 'loss_peak_mb', ',.0f')} | {cell(theirs, 'loss_peak_mb', ',.0f')} | "
            f"{mem_ratio} | {cell(ours, 'time_s', '.1f')} | {cell(theirs, 'time_s', '.1f')} | {time_ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=BATCHES)
    parser.add_argument("--impls", type=lambda s: s.split(","), default=IMPLS, help="mmcl, openclip, mmcl-dense")
    parser.add_argument("--chunk", type=int, default=None, help="mmcl's chunk_size (default: mmcl.losses.chunked.DEFAULT_CHUNK)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 up to 16k, 1 above")
    parser.add_argument("--wait-s", type=int, default=900, help="how long to wait for memory before skipping")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the results are appended to")
    parser.add_argument("--report", action="store_true", help="only print the table of the results file")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.chunk, args.threads)))
        return
    if not args.report:
        for batch in args.batches:
            for impl in args.impls:
                result = run_config(impl, batch, args)
                with args.results.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                detail = (f"peak {result['loss_peak_mb']:,.0f} MB, {result['time_s']:.1f} s (times {result['times_s']})"
                          if result["status"] == "ok" else f"{result['status']}: {result['reason']}")
                print(f"[{impl} {batch}] {detail}", flush=True)
    print(table(load_results(args.results)))


if __name__ == "__main__":
    main()
