"""The training data path alone (no model): plain `clip` data vs `distill.store` data, samples/s.

    python benchmarks/store_loader.py --work /tmp/curation_bench/final [--batches 150] [--workers 0] [--parts-kept 4 8]

Reads the student run configs that `benchmarks/curation.py` wrote (<work>/configs/student_clip.yaml
and student_distill_store.yaml: the same shards, shuffle buffer and batch size, one with a
reinforced store), builds each run's training loader as the trainer does
(`mmcl.engine.training_data.build`) and times `--batches` batches after the first, alternating the
two. `--parts-kept` sets the store's per-worker part cache (`mmcl.data.reinforced.PARTS_KEPT`) in
this process for each measurement, to show what the cache size costs; with 0 workers the parts
read are counted too.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def measure(config: Path, batches: int, workers: int) -> tuple[float, int | None]:
    """(samples/s over `batches` batches after the first, store parts read or None)."""
    from mmcl.config import load_config
    from mmcl.engine import training_data
    from mmcl.models import build_tokenizer

    cfg = load_config(str(config), [f"data.num_workers={workers}"])
    loader = training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1)
    batches_of = training_data.endless(loader)
    next(batches_of)  # start-up: workers, first shard
    started, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(batches_of)["keys"])
    rate = samples / (time.perf_counter() - started)
    store = getattr(getattr(loader.cfg, "sample", None), "store", None) if workers == 0 else None
    return rate, (store.parts_read if store is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curation_bench/final"))
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--parts-kept", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args(argv)
    from mmcl.data import reinforced

    print("| store parts kept per worker | plain samples/s | store samples/s | ratio | store parts read |\n|---:|---:|---:|---:|---:|")
    for kept in args.parts_kept:
        reinforced.PARTS_KEPT = kept
        plain, _ = measure(args.work / "configs" / "student_clip.yaml", args.batches, args.workers)
        store, reads = measure(args.work / "configs" / "student_distill_store.yaml", args.batches, args.workers)
        print(f"| {kept} | {plain:.0f} | {store:.0f} | {store / plain:.2f}x | {reads if reads is not None else '-'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
