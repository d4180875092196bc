"""The `mmcl curate` command group: each subcommand is a module with `add_arguments(parser)` and `main(args)`.

`mmcl.cli` calls `add_curate_commands(commands)` to register the group and `run_curate(args)` to run it.
User errors (a missing scores folder, a bad rule, a foreign --out) print one line and return 2.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# subcommand -> (module, help, description)
SUBCOMMANDS = {
    "select": ("mmcl.curate.select", "choose samples from a scores folder: score filter, semantic dedup, MetaCLIP balancing",
               "Apply the rules in this order, each to what the previous kept: score filter (--keep-fraction or "
               "--min-score), semantic dedup (--dedup-threshold), balancing (--metadata, --balance-threshold). "
               "Writes one Parquet row per selected sample (key, probability, shard, index) and prints what each "
               "rule removed."),
    "write": ("mmcl.curate.write", "write a selection as new WebDataset shards (original bytes, sizes.json)",
              "Copy the selected samples (those with probability < 1 as drawn for --epoch and --seed, like the "
              "loader) from --shards into new shards in --out, bytes unchanged, with sizes.json."),
}


def add_curate_commands(commands: argparse._SubParsersAction) -> None:
    """Add `curate` and its subcommands to the `mmcl` parser's subcommands."""
    curate = commands.add_parser("curate", help="select curated subsets of shards, write them as shards (data curation)",
                                 description="Data curation over WebDataset shards (docs/guides/curation.md).")
    sub = curate.add_subparsers(dest="curate_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help, description) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help, description=description)
        import_module(module).add_arguments(parser)


def run_curate(args: argparse.Namespace) -> int:
    """Run `mmcl curate <subcommand>`; user errors -> one line on stderr, status 2."""
    from mmcl.redact import redact

    from .select_io import SelectionError

    try:
        return import_module(SUBCOMMANDS[args.curate_command][0]).main(args)
    except SelectionError as error:
        print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
        return 2
