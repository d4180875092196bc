"""The `mmcl` command: export a run to `transformers` format, and push an export to the Hub.

    mmcl export --run RUN_OR_CHECKPOINT --out DIR [--overwrite] [--license ID] [--dataset ID ...] [--trust-checkpoint] [--peft-adapters]
    mmcl push --model DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG] [--allow-inexact]
    mmcl export --run RUN --out DIR --format openclip [--hub-repo-id ORG/NAME]   (OpenCLIP's hub layout)
    mmcl convert openclip --model NAME|hf-hub:ORG/NAME|local-dir:PATH [--weights FILE] [--config JSON] --out DIR
    mmcl wise-ft --zero-shot DIR --fine-tuned DIR --alpha A [--alpha B ...] --out DIR [--eval --data T --data H ...]
    mmcl curate score --model M --shards PATTERN --out DIR [--batch-size N] [--workers N] [--overwrite]
                                   (data curation, mmcl/curate/; runs under deepspeed / torchrun too)
    mmcl curate select --scores DIR [rules] --out FILE    /    mmcl curate write --selection FILE --shards PATTERN --out DIR
    mmcl benchmark --model M --root DATA_DIR --tasks datacomp|clip_benchmark|FILE --out DIR [--batch-size N]
                                   (a task list in CLIP_benchmark's layout, mmcl/evaluation/benchmark*.py; runs under deepspeed / torchrun)
    mmcl benchmark compare DIR_A DIR_B [...]   (per-task deltas of benchmark outputs)

User errors print one line (`mmcl: error: ...`) and exit with status 2; a bad --out is one of them,
said before any work (mmcl/export/staging.py: --overwrite replaces only an earlier mmcl output). `push` does not import
torch, so it starts in about a second.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_out_options(parser: argparse.ArgumentParser, help: str) -> None:
    """--out and --overwrite, as every command that writes a folder has them (checked by mmcl.export.staging)."""
    parser.add_argument("--out", required=True, metavar="DIR", help=help)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds an earlier mmcl export or conversion (never another folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="mmcl model tools: export to transformers, push to the Hub, curate data.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's launcher
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,push,convert,wise-ft,curate,benchmark}")

    export = commands.add_parser("export", help="write a transformers folder (weights, processor, card) from a run",
                                 description="Export a run directory, one of its checkpoints/step_* folders or its "
                                             "model/ folder to a folder transformers loads offline.")
    export.add_argument("--run", required=True, metavar="PATH", help="run output_dir, checkpoints/step_* folder or model/ folder")
    add_out_options(export, "export folder to create")
    export.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a checkpoint that holds objects besides tensors and DeepSpeed's types (can run code: only checkpoints you trust)")
    export.add_argument("--license", default=None, metavar="ID", help="license id for the model card (default: other)")
    export.add_argument("--dataset", action="append", default=None, metavar="ID",
                        help="Hub dataset id for the card's metadata (repeatable; default: names from the shard paths)")

    export.add_argument("--format", choices=("transformers", "openclip"), default="transformers",
                        help="transformers (default) or openclip: open_clip_config.json + weights, as open_clip.push_to_hf_hub writes")
    export.add_argument("--peft-adapters", action="store_true",
                        help="LoRA runs: also write each LoRA tower's adapters as a peft adapter folder under adapters/ "
                             "(the export itself has them merged)")
    export.add_argument("--hub-repo-id", default=None, metavar="ORG/NAME",
                        help="openclip format: the repo it will be pushed to (OpenCLIP's hf-hub: loading reads the tokenizer there)")

    convert = commands.add_parser("convert", help="convert another library's checkpoint to a transformers folder")
    sources = convert.add_subparsers(dest="source", required=True, metavar="{openclip}")
    openclip = sources.add_parser("openclip", help="an OpenCLIP CLIP checkpoint -> transformers CLIPModel folder",
                                  description="Write a CLIPModel folder (weights, CLIP tokenizer, image processor) that "
                                              "reproduces the OpenCLIP model; start a run from it with model.init_from.")
    openclip.add_argument("--model", required=True, metavar="NAME", help="OpenCLIP architecture (e.g. ViT-B-32), hf-hub:ORG/NAME or local-dir:PATH")
    openclip.add_argument("--weights", default=None, metavar="FILE", help="checkpoint file for a named architecture (.safetensors, .pt, .bin)")
    openclip.add_argument("--config", default=None, metavar="JSON", help="an OpenCLIP model config file for a custom architecture (its stem is the name)")
    add_out_options(openclip, "folder to create")

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
    _add_wise_ft(commands)
    from mmcl.curate.cli import add_curate_commands

    add_curate_commands(commands)
    from mmcl.evaluation.benchmark_cli import add_benchmark_command

    add_benchmark_command(commands)
    return parser


def _add_wise_ft(commands) -> None:
    from mmcl.evaluation.options import add_zeroshot_options

    wise = commands.add_parser(
        "wise-ft", help="interpolate a zero-shot and a fine-tuned model (WiSE-FT), export each mix, optionally evaluate",
        description="Write (1 - alpha) * zero-shot + alpha * fine-tuned weights as an exact export per --alpha "
                    "(OUT/alpha_<alpha>/). With --eval, classify every --data zero-shot with each mix, print the "
                    "sweep, and write OUT/mmcl_wise_ft.json and OUT/wise_ft.png (target vs held-out top-1).")
    wise.add_argument("--zero-shot", required=True, metavar="DIR", help="the model before fine-tuning: mmcl model dir, run dir or export, or the transformers CLIP/SigLIP/dual-encoder folder or hub id the fine-tune started from")
    wise.add_argument("--fine-tuned", required=True, metavar="DIR", help="the fine-tuned model, of the same architecture")
    wise.add_argument("--alpha", type=float, action="append", required=True, metavar="A",
                      help="mixing weight of the fine-tuned model, 0..1 (repeatable; 0 = zero-shot, 1 = fine-tuned)")
    add_out_options(wise, "folder to create: one export per alpha (+ the sweep with --eval)")
    evaluation = wise.add_argument_group("evaluation (--eval; the options of mmcl-zeroshot)")
    evaluation.add_argument("--eval", action="store_true", help="evaluate every alpha zero-shot on --data")
    evaluation.add_argument("--data", action="append", default=None, metavar="DATA",
                            help="labelled data (shards with .cls, a saved datasets dir or an image folder); repeat: "
                                 "the fine-tuning target first, then held-out datasets")
    add_zeroshot_options(evaluation)
    evaluation.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    evaluation.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    evaluation.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    evaluation.add_argument("--split", default=None, help="split of a saved `datasets` DatasetDict (default: test/validation)")


def main(argv: Sequence[str] | None = None) -> int:
    from mmcl.evaluation.benchmark_cli import compare_argv

    folders = compare_argv(sys.argv[1:] if argv is None else argv)
    if folders is not None:
        from mmcl.evaluation.benchmark_cli import compare_main

        return compare_main(folders)
    args = build_parser().parse_args(argv)
    if args.command == "curate":
        return _curate(args)
    if args.command == "benchmark":
        return _benchmark(args)
    from mmcl.export.errors import ExportError, PushError

    try:
        # --out is checked before torch is imported or anything is loaded (and again by the functions below).
        from mmcl.export.staging import check_convert_out, check_export_out

        if args.command == "wise-ft":
            return _wise_ft(args)
        if args.command == "convert":
            check_convert_out(args.model, args.out, overwrite=args.overwrite, weights=args.weights, config_file=args.config)
        elif args.command == "export":
            check_export_out(args.run, args.out, overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint)
        if args.command == "convert":
            from mmcl.export.openclip_import import convert_openclip

            out, report = convert_openclip(args.model, args.out, weights=args.weights, config_file=args.config,
                                           overwrite=args.overwrite)
            print(f"mmcl: converted {args.model} to {out} (max difference to OpenCLIP: image {report['image_max_diff']:.1e}, "
                  f"text {report['text_max_diff']:.1e}); start a run from it with model.init_from={out}")
        elif args.command == "export" and args.format == "openclip":
            from mmcl.export.openclip import export_openclip

            out = export_openclip(args.run, args.out, overwrite=args.overwrite, repo_id=args.hub_repo_id,
                                  trust_checkpoint=args.trust_checkpoint)
            print(f"mmcl: exported {args.run} to {out} in OpenCLIP's format; load it with "
                  f"open_clip.create_model_and_transforms('local-dir:{out}')")
        elif args.command == "export":
            from mmcl.export.export import export_run

            out = export_run(args.run, args.out, overwrite=args.overwrite, license=args.license, datasets=args.dataset,
                             trust_checkpoint=args.trust_checkpoint, adapters=args.peft_adapters)
            print(f"mmcl: exported {args.run} to {out} (README.md says how to load it)")
        else:
            from mmcl.export.push import push_export, stray_files

            info = push_export(args.model, args.repo_id, private=args.private, revision=args.revision,
                               commit_message=args.commit_message, allow_inexact=args.allow_inexact)
            print(f"mmcl: pushed {args.model} to {args.repo_id} in one commit: {info.commit_url}")
            left_out = stray_files(args.model)
            if left_out:
                print(f"mmcl: left out {len(left_out)} entries that are not part of the export: {', '.join(left_out)}")
    except (ExportError, PushError) as error:
        from mmcl.redact import redact

        print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
        return 2
    return 0


def _curate(args: argparse.Namespace) -> int:
    from mmcl.curate.cli import run_curate
    from mmcl.curate.sharded import launched

    if launched():  # a rank of deepspeed / torchrun: leave as `run_command` does after a process group
        from mmcl.distributed import run_command

        run_command(lambda: run_curate(args))
    return run_curate(args)


def _benchmark(args: argparse.Namespace) -> int:
    from mmcl.curate.sharded import launched
    from mmcl.evaluation.benchmark_cli import run_benchmark_command

    if launched():  # a rank of deepspeed / torchrun: leave as `run_command` does after a process group
        from mmcl.distributed import run_command

        run_command(lambda: run_benchmark_command(args))
    return run_benchmark_command(args)


def _wise_ft(args: argparse.Namespace) -> int:
    from mmcl.export.errors import ExportError
    from mmcl.export.staging import check_out

    if args.eval and not args.data:
        raise ExportError("--eval needs --data: the fine-tuning target first, then held-out data.")
    if args.data and not args.eval:
        raise ExportError("--data is only read with --eval; add --eval to evaluate the sweep.")
    check_out(args.out, overwrite=args.overwrite, sources=[args.zero_shot, args.fine_tuned], what="output folder")
    from mmcl.export.wise_ft import format_sweep, wise_ft

    try:
        summary = wise_ft(args.zero_shot, args.fine_tuned, args.alpha, args.out, overwrite=args.overwrite,
                          eval_args=args if args.eval else None)
    except (ValueError, FileNotFoundError) as error:  # evaluation data and prompts
        raise ExportError(str(error)) from error
    if "sweep" in summary:
        print(format_sweep(summary["sweep"]))
    extra = f", the sweep in {summary['out']}/mmcl_wise_ft.json and wise_ft.png" if "sweep" in summary else ""
    print(f"mmcl: wrote {len(summary['alphas'])} WiSE-FT exports to {summary['out']} "
          f"({', '.join(summary['exports'].values())}){extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
