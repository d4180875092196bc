"""The `mmcl curate` command group: each subcommand is a module with `add_arguments(parser)` and `main(args)`.

`mmcl.cli` calls `add_curate_commands(commands)` to register the group and `run_curate(args)` to run it.
User errors (a bad --out, no shards, a model that does not load, a bad rule) print one line and return 2.
"""
from __future__ import annotations

import argparse
from importlib import import_module

# subcommand -> (module, help, description)
SUBCOMMANDS = {
    "score": ("mmcl.curate.score", "image-text similarity and embeddings of every sample under a model",
              "Score every sample of the shards with a model: cosine similarity of its image and first caption, "
              "and both unit embeddings (float16), one Parquet file per shard under OUT/parts/. Runs under "
              "deepspeed / torchrun with the shards split over ranks; rerun the same command to resume."),
    "reinforce": ("mmcl.curate.reinforce_store", "store K augmentations per sample with each teacher's embeddings",
                  "Write a reinforced store (MobileCLIP): per sample K crop boxes and flips drawn from (seed, key), "
                  "each teacher's image embedding of every crop and its text embedding, one Parquet file per shard "
                  "under OUT/parts/. Train on it with distill.store: OUT (no teacher forward). Runs under "
                  "deepspeed / torchrun; rerun the same command to resume."),
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
    curate = commands.add_parser("curate", help="score, select, write and reinforce shards (data curation)",
                                 description="Data curation over WebDataset shards (docs/guides/curation.md).")
    sub = curate.add_subparsers(dest="curate_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help, description) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help, description=description)
        import_module(module).add_arguments(parser)


def run_curate(args: argparse.Namespace) -> int:
    """Run `mmcl curate <subcommand>`; user errors -> one line on stderr, status 2."""
    from mmcl.curate.errors import CurateError, exit_error

    try:
        return import_module(SUBCOMMANDS[args.curate_command][0]).main(args)
    except CurateError as error:
        return exit_error(error)
