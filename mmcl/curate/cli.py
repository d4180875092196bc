"""The `mmcl curate` command group: `add_curate_commands(commands)` adds it to mmcl's parser, `run_curate(args)` runs it."""
from __future__ import annotations

import argparse
import sys


def add_curate_commands(commands) -> None:
    """Add `curate` and its subcommands to `mmcl`'s subparsers."""
    from . import select, write

    curate = commands.add_parser("curate", help="curate web image-text data: select a subset, write it as shards",
                                 description="Data curation (docs/guides/curation.md).")
    subcommands = curate.add_subparsers(dest="curate_command", required=True, metavar="{select,write}")
    select.add_arguments(subcommands.add_parser(
        "select", help="choose samples from a scores folder: score filter, semantic dedup, MetaCLIP balancing",
        description="Apply the rules in this order, each to what the previous kept: score filter (--keep-fraction or "
                    "--min-score), semantic dedup (--dedup-threshold), balancing (--metadata, --balance-threshold). "
                    "Writes one Parquet row per selected sample (key, probability, shard, index) and prints what "
                    "each rule removed."))
    write.add_arguments(subcommands.add_parser(
        "write", help="write a selection as new WebDataset shards (original bytes, sizes.json)",
        description="Copy the selected samples (those with probability < 1 as drawn for --epoch and --seed, like "
                    "the loader) from --shards into new shards in --out, bytes unchanged, with sizes.json."))


def run_curate(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; a user error prints one line and returns 2."""
    from mmcl.redact import redact

    from .select_io import SelectionError

    try:
        if args.curate_command == "select":
            from .select import main
        else:
            from .write import main
        return main(args)
    except SelectionError as error:
        print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
        return 2
