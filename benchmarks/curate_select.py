"""The cost of `mmcl curate select` on synthetic scores: wall time and peak memory of each rule and of all three.

    python benchmarks/curate_select.py [--n 1000000] [--dim 512] [--work /tmp/curate_select_bench]

Writes a scores folder in `mmcl curate score`'s format (100 parts; float16 L2-normalised image
embeddings around 5,000 cluster centres, 10% planted near-duplicates, captions drawing entries of a
1,000-entry metadata list with Zipf frequencies, scores ~ N(0.25, 0.05)), once per (n, dim), then
runs each command as its own `python -m mmcl.cli curate select ...` process and reports its wall
time and peak RSS (the child's own, from wait4). Threads: whatever OMP_NUM_THREADS allows (faiss).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_scores(root: Path, n: int, dim: int, parts: int = 100, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = root / "bench.json"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "dim": dim, "parts": parts, "seed": seed}:
        return
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5000, dim)).astype(np.float32)
    entries = [f"entry{i:04d}" for i in range(1000)]
    weights = 1.0 / np.arange(1, 1001)
    weights /= weights.sum()
    (root / "parts").mkdir(parents=True, exist_ok=True)
    (root / "entries.txt").write_text("\n".join(entries) + "\n")
    per = -(-n // parts)
    for p in range(parts):
        m = min(per, n - p * per)
        x = centres[rng.integers(0, len(centres), m)] + rng.normal(size=(m, dim)).astype(np.float32)
        dup = np.flatnonzero(rng.random(m) < 0.1)
        x[dup] = x[np.maximum(dup - 1, 0)] + 0.01 * rng.normal(size=(len(dup), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        picks = rng.choice(len(entries), size=m, p=weights)
        captions = [f"a photo of {entries[k]} on a table" if k % 10 else "an unrelated caption" for k in picks]
        table = pa.table({
            "key": pa.array([f"{p:05d}{i:05d}" for i in range(m)], pa.string()),
            "shard": pa.array([f"shards/{p:05d}.tar"] * m, pa.string()),
            "index": pa.array(np.arange(m, dtype=np.int32)),
            "caption": pa.array(captions, pa.string()),
            "score": pa.array(rng.normal(0.25, 0.05, m).astype(np.float32)),
            "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1)), dim),
            "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(m * dim, np.float16)), dim),
        }).replace_schema_metadata({"mmcl": json.dumps({"skips": {}, "samples": m})})
        pq.write_table(table, root / "parts" / f"{p:05d}-{p:05d}.parquet")
    done.write_text(json.dumps({"n": n, "dim": dim, "parts": parts, "seed": seed}))


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB, last stdout lines) of one `mmcl` process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mmcl.cli", *argv], stdout=subprocess.PIPE, text=True, env=env)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: mmcl {' '.join(argv)}\n{out}")
    return seconds, usage.ru_maxrss / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", default="/tmp/curate_select_bench")
    args = parser.parse_args()
    work = Path(args.work)
    start = time.perf_counter()
    make_scores(work / "scores", args.n, args.dim)
    print(f"scores: {args.n} samples x {args.dim} in {time.perf_counter() - start:.0f} s "
          f"({sum(p.stat().st_size for p in (work / 'scores' / 'parts').iterdir()) / 2**30:.2f} GiB)")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    base = ["curate", "select", "--scores", str(work / "scores"), "--overwrite"]
    cases = {
        "score filter (--keep-fraction 0.3)": ["--keep-fraction", "0.3"],
        "balance (--balance-threshold 2000)": ["--metadata", str(work / "scores" / "entries.txt"), "--balance-threshold", "2000"],
        "dedup (--dedup-threshold 0.95)": ["--dedup-threshold", "0.95"],
        "all three": ["--keep-fraction", "0.3", "--dedup-threshold", "0.95", "--metadata",
                      str(work / "scores" / "entries.txt"), "--balance-threshold", "2000"],
    }
    print(f"| rules | wall (s) | peak RSS (GiB) | selected |")
    print("|---|---:|---:|---:|")
    for name, rules in cases.items():
        seconds, rss, out = timed(base + rules + ["--out", str(work / "selection.parquet")])
        selected = next(line for line in out.splitlines() if line.startswith("selected"))
        print(f"| {name} | {seconds:.1f} | {rss:.2f} | {selected.split()[1]} |", flush=True)


if __name__ == "__main__":
    main()
