"""The `mmcl` command: export a run to `transformers` format, and push an export to the Hub.

    mmcl export --run RUN_OR_CHECKPOINT --out DIR [--overwrite] [--license ID] [--dataset ID ...]
    mmcl push --model DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG] [--allow-inexact]

User errors print one line (`mmcl: error: ...`) and exit with status 2. `push` does not import
torch, so it starts in about a second.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="mmcl model tools: export to transformers, push to the Hub.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,push}")

    export = commands.add_parser("export", help="write a transformers folder (weights, processor, card) from a run",
                                 description="Export a run directory, one of its checkpoints/step_* folders or its "
                                             "model/ folder to a folder transformers loads offline.")
    export.add_argument("--run", required=True, metavar="PATH", help="run output_dir, checkpoints/step_* folder or model/ folder")
    export.add_argument("--out", required=True, metavar="DIR", help="export folder to create")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--license", default=None, metavar="ID", help="license id for the model card (default: other)")
    export.add_argument("--dataset", action="append", default=None, metavar="ID",
                        help="Hub dataset id for the card's metadata (repeatable; default: names from the shard paths)")

    push = commands.add_parser("push", help="upload an export folder to the Hugging Face Hub in one commit",
                               description="Upload an export to a model repo. The token comes from HF_TOKEN or "
                                           "`hf auth login`; HF_ENDPOINT selects another Hub.")
    push.add_argument("--model", required=True, metavar="DIR", help="export folder written by `mmcl export`")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="model repo, created if missing")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", default=None, metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    push.add_argument("--commit-message", default=None, metavar="MSG", help="commit title")
    push.add_argument("--allow-inexact", action="store_true",
                      help="push an export that plain transformers does not reproduce on some side (refused by default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmcl.export.errors import ExportError, PushError

    try:
        if args.command == "export":
            from mmcl.export.export import export_run

            out = export_run(args.run, args.out, overwrite=args.overwrite, license=args.license, datasets=args.dataset)
            print(f"mmcl: exported {args.run} to {out} (README.md says how to load it)")
        else:
            from mmcl.export.push import push_export

            info = push_export(args.model, args.repo_id, private=args.private, revision=args.revision,
                               commit_message=args.commit_message, allow_inexact=args.allow_inexact)
            print(f"mmcl: pushed {args.model} to {args.repo_id} in one commit: {info.commit_url}")
    except (ExportError, PushError) as error:
        print(f"mmcl: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
