"""`mmcl curate select`: choose the samples to train on from a scores folder, and their per-epoch probability.

    mmcl curate select --scores DIR [--keep-fraction F | --min-score S]
                       [--dedup-threshold T [--dedup-clusters K] [--seed N]]
                       [--metadata FILE --balance-threshold t [--keep-unmatched]] --out FILE [--overwrite]

The rules run in this fixed order, each on what the previous one kept:

1. score filter (DataComp): `--min-score S` keeps score >= S; `--keep-fraction F` keeps the
   round(F * n) samples of highest score, ties broken by key (ascending), so the cut is exact.
2. semantic dedup (SemDeDup, semdedup.py): k-means on the image embeddings, then within each
   cluster, visiting samples by highest score first (ties by key), a sample whose cosine to a kept
   one is above T is dropped.
3. balancing (MetaCLIP, balance.py): entries of the metadata file counted in the captions of the
   samples that reach this rule; each sample gets p = 1 - prod(1 - min(1, t / count_e)) over its
   entries; samples matching no entry are dropped, or kept with p = 1 with --keep-unmatched.

The selection (select_io.py) holds one row per kept sample, in the scores' order (shard order,
then position): key, probability (1.0 unless balanced), shard, index; its Parquet metadata "mmcl"
holds the rules, their arguments and counts, which are also printed as a table.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .select_io import SelectionError, check_out_file, read_scores, write_selection


@dataclass
class RuleResult:
    """What one rule did: `removed` of its `input` samples; for balancing also the expected per-epoch count."""

    rule: str
    arguments: dict[str, Any]
    input: int
    removed: int
    expected_per_epoch: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"rule": self.rule, "arguments": self.arguments, "input": self.input, "removed": self.removed,
               "output": self.input - self.removed}
        if self.expected_per_epoch is not None:
            out["expected_per_epoch"] = self.expected_per_epoch
        return {**out, **self.extra}


def check_rules(args: argparse.Namespace) -> None:
    """Every argument error, said before anything is read."""
    if args.keep_fraction is not None and args.min_score is not None:
        raise SelectionError("--keep-fraction and --min-score are two forms of the score filter; pass only one.")
    if args.keep_fraction is not None and not (0.0 < args.keep_fraction <= 1.0):
        raise SelectionError(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}; e.g. 0.3 keeps the top 30% by score.")
    if args.min_score is not None and not math.isfinite(args.min_score):
        raise SelectionError(f"--min-score must be a finite number, got {args.min_score}.")
    if args.dedup_threshold is not None and not (0.0 < args.dedup_threshold < 1.0):
        raise SelectionError(f"--dedup-threshold must be a cosine similarity in (0, 1), got {args.dedup_threshold}; e.g. 0.95.")
    if args.dedup_clusters is not None and args.dedup_threshold is None:
        raise SelectionError("--dedup-clusters is only used with --dedup-threshold; add --dedup-threshold T.")
    if args.dedup_clusters is not None and args.dedup_clusters < 1:
        raise SelectionError(f"--dedup-clusters must be at least 1, got {args.dedup_clusters}.")
    if args.metadata is None and (args.balance_threshold is not None or args.keep_unmatched):
        raise SelectionError("--balance-threshold and --keep-unmatched balance over a metadata list; add --metadata FILE.")
    if args.metadata is not None and args.balance_threshold is None:
        raise SelectionError("--metadata needs --balance-threshold t: the per-epoch count each entry is sampled down to.")
    if args.balance_threshold is not None and not (args.balance_threshold > 0 and math.isfinite(args.balance_threshold)):
        raise SelectionError(f"--balance-threshold must be a positive number, got {args.balance_threshold}.")
    if args.keep_fraction is None and args.min_score is None and args.dedup_threshold is None and args.metadata is None:
        raise SelectionError("no rule given; pass --keep-fraction or --min-score, --dedup-threshold, and/or --metadata "
                             "with --balance-threshold.")


def priority_order(keys: list[str], scores: np.ndarray) -> np.ndarray:
    """int64 [n]: positions by score descending, ties (and NaN, last) by key ascending."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.table({"score": pa.array(np.asarray(scores, np.float32)), "key": pa.array(keys, pa.string())})
    return pc.sort_indices(table, sort_keys=[("score", "descending"), ("key", "ascending")]).to_numpy().astype(np.int64)


def score_filter(keys: list[str], scores: np.ndarray, keep_fraction: float | None, min_score: float | None
                 ) -> tuple[np.ndarray, RuleResult]:
    """(keep bool [n], result): the top round(F * n) by (score desc, key asc), or score >= S."""
    n = len(keys)
    keep = np.zeros(n, dtype=bool)
    if keep_fraction is not None:
        count = int(math.floor(keep_fraction * n + 0.5))
        keep[priority_order(keys, scores)[:count]] = True
        arguments: dict[str, Any] = {"keep_fraction": keep_fraction}
    else:
        keep = np.asarray(scores, np.float32) >= np.float32(min_score)  # NaN scores fail the test
        arguments = {"min_score": min_score}
    return keep, RuleResult("score", arguments, n, int(n - keep.sum()))


def select(scores: dict[str, Any], args: argparse.Namespace, entries: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[RuleResult]]:
    """Apply the rules to the score columns; (rows kept int64 [m] in input order, probability float64 [m], results)."""
    keys = scores["key"]
    rows = np.arange(len(keys), dtype=np.int64)
    results: list[RuleResult] = []
    if args.keep_fraction is not None or args.min_score is not None:
        keep, result = score_filter(keys, scores["score"], args.keep_fraction, args.min_score)
        rows = rows[keep]
        results.append(result)
    if args.dedup_threshold is not None:
        from .semdedup import semdedup

        subset_keys = [keys[r] for r in rows]
        priority = priority_order(subset_keys, scores["score"][rows])
        keep, k = semdedup(scores["image_embedding"][rows], priority, args.dedup_threshold, args.dedup_clusters, args.seed)
        results.append(RuleResult("dedup", {"threshold": args.dedup_threshold, "clusters": k, "seed": args.seed},
                                  len(rows), int(len(rows) - keep.sum())))
        rows = rows[keep]
    probability = np.ones(len(rows), dtype=np.float64)
    if entries is not None:
        from .balance import balance_probabilities, entry_counts, match_entries

        captions = [scores["caption"][r] for r in rows]
        matches = match_entries(captions, entries)
        counts = entry_counts(matches, len(entries))
        p, matched = balance_probabilities(matches, counts, args.balance_threshold, len(rows))
        keep = matched | bool(args.keep_unmatched)
        probability = np.where(matched, p, 1.0)[keep]
        results.append(RuleResult(
            "balance", {"metadata": Path(args.metadata).name, "entries": len(entries), "threshold": args.balance_threshold,
                        "keep_unmatched": bool(args.keep_unmatched)},
            len(rows), int(len(rows) - keep.sum()), expected_per_epoch=float(probability.sum()),
            extra={"unmatched": int((~matched).sum()), "entries_matched": int((counts > 0).sum()),
                   "head_entries": int((counts > args.balance_threshold).sum())}))
        rows = rows[keep]
    return rows, probability, results


def format_table(results: list[RuleResult], selected: int, expected: float) -> str:
    """The printed summary: one line per rule (input, removed, % of its input, output)."""
    lines = [f"{'rule':<8} {'arguments':<50} {'input':>10} {'removed':>10} {'%':>7} {'output':>10}"]
    for r in results:
        arguments = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in r.arguments.items() if v is not False)
        share = 100.0 * r.removed / r.input if r.input else 0.0
        line = f"{r.rule:<8} {arguments:<50} {r.input:>10} {r.removed:>10} {share:>6.1f}% {r.input - r.removed:>10}"
        if r.expected_per_epoch is not None:
            line += f"  (expected per epoch {r.expected_per_epoch:.1f}; {r.extra['unmatched']} unmatched)"
        lines.append(line)
    lines.append(f"selected {selected} samples, expected {expected:.1f} per epoch")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, metavar="DIR", help="the --out folder of `mmcl curate score` (DIR/parts/*.parquet)")
    parser.add_argument("--out", required=True, metavar="FILE", help="selection Parquet file to write (key, probability, shard, index)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier selection (never another file)")
    score = parser.add_argument_group("1. score filter (DataComp)")
    score.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                       help="keep the F*n samples of highest score (rounded, halves up; ties by key), 0 < F <= 1")
    score.add_argument("--min-score", type=float, default=None, metavar="S", help="keep samples with score >= S")
    dedup = parser.add_argument_group("2. semantic dedup (SemDeDup)")
    dedup.add_argument("--dedup-threshold", type=float, default=None, metavar="T",
                       help="drop a sample whose image-embedding cosine to a kept one in its cluster is above T (e.g. 0.95)")
    dedup.add_argument("--dedup-clusters", type=int, default=None, metavar="K", help="k-means clusters (default round(sqrt(n)))")
    dedup.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    balance = parser.add_argument_group("3. balancing (MetaCLIP)")
    balance.add_argument("--metadata", default=None, metavar="FILE", help="metadata entries, one per line, matched as lower-cased sub-strings of the captions")
    balance.add_argument("--balance-threshold", type=float, default=None, metavar="t",
                         help="per-epoch samples per entry: an entry with count c > t picks each of its samples with probability t/c")
    balance.add_argument("--keep-unmatched", action="store_true", help="keep samples matching no entry (probability 1) instead of dropping them")


def main(args: argparse.Namespace) -> int:
    """Run `mmcl curate select`; user errors raise SelectionError (printed by the CLI as one line)."""
    check_rules(args)
    check_out_file(args.out, args.overwrite)
    entries = None
    if args.metadata is not None:
        from .balance import read_metadata

        entries = read_metadata(args.metadata)
    columns = ["key", "shard", "index", "score"]
    columns += ["image_embedding"] if args.dedup_threshold is not None else []
    columns += ["caption"] if entries is not None else []
    scores = read_scores(args.scores, columns)
    if not scores["key"]:
        raise SelectionError(f"scores folder {args.scores} holds no scored sample; check that its shards have good samples.")
    repeated = len(scores["key"]) - len(set(scores["key"]))
    if repeated:  # the loader and `mmcl curate write` know a sample by its key alone
        print(f"mmcl: warning: {repeated} keys occur more than once in the scores (the same key in several shards); "
              "the loader treats each key as one sample.", flush=True)
    rows, probability, results = select(scores, args, entries)
    expected = float(probability.sum())
    print(format_table(results, len(rows), expected), flush=True)
    if len(rows) == 0:
        raise SelectionError("the rules removed every sample, so no selection was written; loosen them (a lower "
                             "--min-score, a larger --keep-fraction or --dedup-threshold, --keep-unmatched).")
    from mmcl.redact import redact

    info = {"scores": redact(str(args.scores)), "rules": [r.to_dict() for r in results], "input": len(scores["key"]),
            "selected": int(len(rows)), "expected_per_epoch": expected, "repeated_keys": repeated}
    out = write_selection(args.out, {"key": [scores["key"][r] for r in rows], "probability": probability,
                                     "shard": [scores["shard"][r] for r in rows], "index": scores["index"][rows]},
                          info, overwrite=args.overwrite)
    print(f"mmcl: wrote the selection to {out}", flush=True)
    return 0

