"""The class-name and prompt options of `mmcl-zeroshot`, shared with `mmcl wise-ft --eval`.

Imports no torch (mmcl.evaluation loads its modules on first use), so building the `mmcl` parser stays torch-free.
"""
from __future__ import annotations

import argparse

from mmcl.evaluation.prompts import builtin_prompt_sets


def add_zeroshot_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--prompts, --classnames, --templates, --text-batch-size."""
    parser.add_argument("--prompts", default=None, help=f"built-in set for both class names and templates ({', '.join(builtin_prompt_sets())})")
    parser.add_argument("--classnames", default=None, help="built-in set name or FILE (.txt one per line, or .json list)")
    parser.add_argument("--templates", default=None,
                        help="built-in set name or FILE (.txt/.json list with {c}, or .json {classname: [prompts]} CuPL-style)")
    parser.add_argument("--text-batch-size", type=int, default=256, help="prompts per text-encoder batch (default 256)")
