"""`mmcl benchmark` and `mmcl benchmark compare` (registered by mmcl/cli.py; imports no torch until run).

    mmcl benchmark --model DIR --root DATA_DIR --tasks datacomp|clip_benchmark|FILE --out DIR [--batch-size N] [--workers N]
    mmcl benchmark compare DIR_A DIR_B [...]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mmcl.evaluation.settings import BUILTIN_TASK_LISTS


def add_benchmark_command(commands) -> None:
    parser = commands.add_parser(
        "benchmark", help="score a task list (DataComp's 38, CLIP_benchmark's, or yours); `benchmark compare` diffs outputs",
        description="Score a model on every task of a list whose dataset is under --root (CLIP_benchmark's WebDataset "
                    "layout wds_<name>/test/*.tar), sharded over the ranks under deepspeed / torchrun. Writes one "
                    "CLIP_benchmark JSON per task, results.md / results.csv / results.png; a rerun skips the finished "
                    "tasks. `mmcl benchmark compare DIR_A DIR_B ...` prints the per-task deltas.")
    add_benchmark_arguments(parser)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M",
                        help="mmcl run / model dir / export, a transformers CLIP/SigLIP folder (e.g. from `mmcl convert "
                             "openclip`), or openclip:ARCH with --weights")
    parser.add_argument("--root", required=True, metavar="DATA_DIR", help="folder holding wds_<dataset>/ folders")
    parser.add_argument("--tasks", required=True, metavar="LIST",
                        help=f"built-in task list ({', '.join(BUILTIN_TASK_LISTS)}) or a YAML task list file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the results (new, empty, or an earlier `mmcl benchmark` output to finish)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="data-loading processes per rank (default 2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--weights", default=None, metavar="FILE", help="openclip:ARCH: its checkpoint file")
    parser.add_argument("--openclip-config", default=None, metavar="JSON",
                        help="openclip:ARCH: a model config registering an architecture open_clip lacks")


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Run `mmcl benchmark` from parsed arguments; user errors are one line on stderr and status 2."""
    from mmcl.redact import redact

    try:
        from mmcl.evaluation.benchmark import check_inputs, run_benchmark

        check_inputs(args.tasks, args.root, args.out)  # before torch or the model load
        run_benchmark(args.model, args.root, args.tasks, args.out, args.batch_size, args.workers, args.device,
                      args.weights, args.openclip_config)
    except (ValueError, FileNotFoundError) as error:
        print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
        return 2
    return 0


def compare_main(argv: Sequence[str]) -> int:
    """`mmcl benchmark compare DIR_A DIR_B ...`."""
    parser = argparse.ArgumentParser(prog="mmcl benchmark compare",
                                     description="Print each task's main metric in DIR_A and its delta in every other folder.")
    parser.add_argument("folders", nargs="+", metavar="DIR", help="`mmcl benchmark` output folders (the first is A)")
    args = parser.parse_args(list(argv))
    from mmcl.evaluation.benchmark_report import compare

    try:
        print(compare(args.folders))
    except ValueError as error:
        print(f"mmcl: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


def compare_argv(argv: Sequence[str]) -> list[str] | None:
    """The folders' part of `mmcl [--local_rank=N] benchmark compare ...`, or None for another command."""
    rest = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    return rest[2:] if rest[:2] == ["benchmark", "compare"] else None
