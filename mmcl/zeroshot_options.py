"""The class-name and prompt options of `mmcl-zeroshot`, shared with `mmcl wise-ft --eval`.

Outside mmcl.evaluation (which imports torch) so that building the `mmcl` parser stays torch-free.
"""
from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "evaluation" / "prompts"


def builtin_names() -> list[str]:
    """Names of the built-in prompt sets (mmcl/evaluation/prompts/*.json)."""
    return sorted(path.stem for path in PROMPTS_DIR.glob("*.json"))


def add_zeroshot_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--prompts, --classnames, --templates, --text-batch-size."""
    parser.add_argument("--prompts", default=None, help=f"built-in set for both class names and templates ({', '.join(builtin_names())})")
    parser.add_argument("--classnames", default=None, help="built-in set name or FILE (.txt one per line, or .json list)")
    parser.add_argument("--templates", default=None,
                        help="built-in set name or FILE (.txt/.json list with {c}, or .json {classname: [prompts]} CuPL-style)")
    parser.add_argument("--text-batch-size", type=int, default=256, help="prompts per text-encoder batch (default 256)")
