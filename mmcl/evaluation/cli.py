"""Command-line evaluation: zero-shot classification, retrieval, kNN and linear probes.

Each command loads one model (an mmcl model directory or an open_clip architecture with
local weights), reads the data (shards, a saved `datasets` dataset, or an image folder),
prints a table and, with --output, writes CLIP_benchmark's JSON layout:
    {"dataset", "model", "pretrained", "task", "metrics": {...}, "language": "en", ...}
Under torchrun (WORLD_SIZE > 1) the images are split over the ranks and rank 0 reports.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmcl.distributed import run_command
from mmcl.evaluation.prompts import builtin_prompt_sets
from mmcl.evaluation.options import add_zeroshot_options
from mmcl.evaluation.running import setup_distributed, skipped_counts, zeroshot_metrics

BUILTIN_HELP = (
    "Built-in prompt sets (mmcl/evaluation/prompts/*.json): " + ", ".join(builtin_prompt_sets()) +
    ". Templates hold the class name as {c} or {}."
)


# ----------------------------------------------------------------------------- shared options


def _parser(description: str, task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=BUILTIN_HELP if task == "zeroshot_classification" else None)
    model = parser.add_argument_group("model (exactly one)")
    model.add_argument("--model", metavar="DIR", help="mmcl model directory (config.yaml + model.safetensors [+ tokenizer/])")
    model.add_argument("--openclip-model", metavar="NAME", help="open_clip architecture name, e.g. ViT-B-32")
    model.add_argument("--openclip-weights", metavar="FILE", help="local open_clip weights (.pt/.bin/.safetensors); omit for random init")
    model.add_argument("--openclip-config", metavar="JSON", help="extra open_clip model config file to register (name = file stem)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    parser.add_argument("--split", default=None, help="split of a saved `datasets` DatasetDict (default: test/validation)")
    parser.add_argument("--dataset-name", default=None, help="name written as 'dataset' in the JSON (default: from the data path)")
    parser.add_argument("--output", metavar="FILE", default=None, type=output_template,
                        help="write the JSON here; may use {dataset}, {model}, {pretrained}, {task}, {language}")
    return parser


OUTPUT_FIELDS = ("dataset", "model", "pretrained", "task", "language")


def output_template(value: str) -> str:
    """Check an --output template before any work: only the known {fields}, and a folder that can be written.

    Raises argparse.ArgumentTypeError (argparse prints it as one usage line, exit 2).
    """
    names = [name for _, name, _, _ in _fields_of(value)]
    unknown = [name for name in names if name not in OUTPUT_FIELDS]
    if unknown or any(name is None for name in names):
        what = f"unknown field {{{unknown[0]}}}" if unknown and unknown[0] is not None else "not a valid template"
        raise argparse.ArgumentTypeError(
            f"'{value}': {what}; the fields are {', '.join('{' + f + '}' for f in OUTPUT_FIELDS)} "
            "(write a literal brace as {{ or }}).")
    # The part before the first field names a folder that must be creatable; check it now, not after the evaluation.
    prefix = value.split("{", 1)[0] if names else value
    folder = Path(prefix) if names and prefix.endswith("/") else Path(prefix).parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"'{value}': {existing} is not a folder this user can write to.")
    if not names and Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is a folder; give a file name such as {Path(value) / 'result.json'}.")
    return value


def _fields_of(template: str) -> list[tuple]:
    """string.Formatter's parse of `template`, with a malformed one as a single (.., None, ..) entry."""
    try:
        return [item for item in string.Formatter().parse(template) if item[1] is not None]
    except ValueError:
        return [("", None, "", None)]


def _model(args: argparse.Namespace, device: torch.device):
    from mmcl.evaluation.loading import load_eval_model

    return load_eval_model(args.model, args.openclip_model, args.openclip_weights, args.openclip_config, device)


def _dataset_name(args: argparse.Namespace, data: str) -> str:
    if args.dataset_name:
        return args.dataset_name
    path = Path(data.split("::")[0])
    return (path if path.is_dir() else path.parent).name or str(path)


def _report(args: argparse.Namespace, task: str, dataset: str, model, metrics: dict, extra: dict | None = None) -> dict:
    """Print a table and write the JSON (rank 0 only), credentials redacted. Returns the result dict."""
    from mmcl.distributed import get_rank
    from mmcl.redact import redact, redact_tree

    dataset = redact(dataset)
    extra = redact_tree(extra)
    result = {"dataset": dataset, "model": model.name, "pretrained": model.pretrained, "task": task,
              "metrics": metrics, "language": "en", **(extra or {})}
    if get_rank() != 0:
        return result
    print(format_table(result))
    if args.output:
        path = Path(args.output.format(dataset=dataset, model=model.name, task=task, language="en",
                                       pretrained=Path(model.pretrained).name.replace("/", "_")))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as error:  # the result is printed above, so nothing is lost
            raise ValueError(f"could not write --output {path} ({error.strerror or error}); the table above is the result.") from None
        print(f"wrote {path}")
    return result


def format_table(result: dict) -> str:
    """A readable two-column table of a result's metrics."""
    rows = [(k, v) for k, v in result["metrics"].items() if not isinstance(v, list)]
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"{result['task']}  dataset={result['dataset']}  model={result['model']}  pretrained={result['pretrained']}",
             f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
    for key in ("num_samples", "num_train", "num_test", "num_captions"):
        if key in result:
            lines.append(f"{key:<{width}}  {result[key]}")
    if result.get("skipped"):
        lines.append(f"skipped samples: {result['skipped']}")
    return "\n".join(lines)


def _main(run: Callable[[list[str] | None], Any], argv: list[str] | None) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as error:
        from mmcl.redact import redact

        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- commands


def run_zeroshot(argv: list[str] | None = None) -> dict:
    parser = _parser("Zero-shot classification (CLIP_benchmark 'zeroshot_classification').", "zeroshot_classification")
    parser.add_argument("--data", required=True, help="labelled data: shards with .cls, a saved `datasets` dir, or an image folder")
    add_zeroshot_options(parser)
    parser.add_argument("--confusion", action="store_true", help="add the confusion matrix to the JSON metrics")
    args = parser.parse_args(argv)

    device = setup_distributed(args.device)
    model = _model(args, device)
    metrics, extra = zeroshot_metrics(args, model, device, args.data, args.confusion)
    dataset = args.dataset_name or args.prompts or _dataset_name(args, args.data)
    return _report(args, "zeroshot_classification", dataset, model, metrics, extra)


def run_retrieval(argv: list[str] | None = None) -> dict:
    parser = _parser("Zero-shot image-text retrieval (CLIP_benchmark 'zeroshot_retrieval').", "zeroshot_retrieval")
    parser.add_argument("--data", required=True, help="image-caption data: shards with .txt (one caption or a JSON list), or a saved `datasets` dir")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall@k values (default 1 5 10)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per score block (memory bound; default 1024)")
    args = parser.parse_args(argv)

    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.retrieval import encode_retrieval_data, retrieval_metrics

    device = setup_distributed(args.device)
    model = _model(args, device)
    loader = build_eval_loader(args.data, model.transform, args.batch_size, args.workers, args.split)
    data = encode_retrieval_data(loader, model.encode_image, model.encode_text, device)
    metrics = retrieval_metrics(
        data["image_features"].to(device), data["text_features"].to(device), data["text_to_image"], args.ks,
        query_chunk=args.chunk_size, item_chunk=max(args.chunk_size, 16384),
    )
    extra = {"num_samples": int(data["image_features"].shape[0]), "num_captions": int(data["text_features"].shape[0]),
             "skipped": skipped_counts(loader)}
    return _report(args, "zeroshot_retrieval", _dataset_name(args, args.data), model, metrics, extra)


def _train_test_parser(description: str, task: str) -> argparse.ArgumentParser:
    parser = _parser(description, task)
    parser.add_argument("--train-data", required=True, help="labelled training data (shards with .cls, `datasets` dir, or image folder)")
    parser.add_argument("--test-data", required=True, help="labelled test data, same forms")
    parser.add_argument("--confusion", action="store_true", help="add the confusion matrix to the JSON metrics")
    return parser


def _labelled_features(args, model, device, source: str, desc: str):
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.features import extract_features

    loader = build_eval_loader(source, model.transform, args.batch_size, args.workers, args.split)
    out = extract_features(loader, model.encode_image, device=device, desc=desc)
    if "label" not in out:
        raise ValueError(f"{source} has no class labels (.cls / label column).")
    return out, loader


def _train_test_run(args: argparse.Namespace) -> tuple[Any, torch.device, dict[str, dict], dict[str, int]]:
    """The setup kNN and the linear probe share: this rank's device, the model, and the image
    features {"features" [N, D], "label" [N]} of each labelled split ("train", "test", and "val"
    when --val-data is given), with the skipped samples summed over splits and ranks."""
    device = setup_distributed(args.device)
    model = _model(args, device)
    sources = {"train": args.train_data, "test": args.test_data}
    if getattr(args, "val_data", None):
        sources["val"] = args.val_data
    splits, loaders = {}, []
    for split, source in sources.items():
        splits[split], loader = _labelled_features(args, model, device, source, f"{split} images")
        loaders.append(loader)
    return model, device, splits, skipped_counts(*loaders)


def _train_test_extra(splits: dict[str, dict], skipped: dict[str, int], **settings: Any) -> dict:
    """The result JSON's extra keys of a train/test evaluation."""
    return {"num_train": int(splits["train"]["features"].shape[0]), "num_test": int(splits["test"]["features"].shape[0]),
            **settings, "skipped": skipped}


def run_knn(argv: list[str] | None = None) -> dict:
    parser = _train_test_parser("Weighted kNN classification on frozen image features (solo-learn style).", "knn")
    parser.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos / T) (default 0.07)")
    args = parser.parse_args(argv)

    from mmcl.evaluation.knn import evaluate_knn

    model, device, splits, skipped = _train_test_run(args)
    train, test = splits["train"], splits["test"]
    metrics = evaluate_knn(train["features"].to(device), train["label"], test["features"].to(device), test["label"],
                           k=args.k, temperature=args.temperature, with_confusion=args.confusion)
    extra = _train_test_extra(splits, skipped, k=args.k, temperature=args.temperature)
    return _report(args, "knn", _dataset_name(args, args.test_data), model, metrics, extra)


def run_linear_probe(argv: list[str] | None = None) -> dict:
    parser = _train_test_parser("Linear probe (logistic regression, C chosen on a validation split) on frozen image features.", "linear_probe")
    parser.add_argument("--val-data", default=None, help="labelled validation data; default: --val-fraction of the training data")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of the training data held out to pick C (default 0.2)")
    parser.add_argument("--cs", type=float, nargs="+", default=None, help="inverse regularisation strengths to try (default 0.01 ... 1000)")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    args = parser.parse_args(argv)

    from mmcl.distributed import get_rank
    from mmcl.evaluation.linear_probe import DEFAULT_CS, evaluate_linear_probe

    model, _, splits, skipped = _train_test_run(args)
    if get_rank() != 0:  # the fit is single-process (scikit-learn); other ranks are done
        return {}
    train, test, val = splits["train"], splits["test"], splits.get("val", {"features": None, "label": None})
    metrics = evaluate_linear_probe(train["features"], train["label"], test["features"], test["label"],
                                    val["features"], val["label"], cs=args.cs or DEFAULT_CS,
                                    val_fraction=args.val_fraction, seed=args.seed, max_iter=args.max_iter,
                                    with_confusion=args.confusion)
    return _report(args, "linear_probe", _dataset_name(args, args.test_data), model, metrics, _train_test_extra(splits, skipped))


def zeroshot_main(argv: Sequence[str] | None = None) -> int:
    """`mmcl-zeroshot`: zero-shot classification."""
    return _main(run_zeroshot, list(argv) if argv is not None else None)


def retrieval_main(argv: Sequence[str] | None = None) -> int:
    """`mmcl-retrieval`: image-text retrieval recall@k."""
    return _main(run_retrieval, list(argv) if argv is not None else None)


def knn_main(argv: Sequence[str] | None = None) -> int:
    """`mmcl-knn`: kNN classification on frozen image features."""
    return _main(run_knn, list(argv) if argv is not None else None)


def linear_probe_main(argv: Sequence[str] | None = None) -> int:
    """`mmcl-linear-probe`: logistic-regression probe on frozen image features."""
    return _main(run_linear_probe, list(argv) if argv is not None else None)


# The console scripts (pyproject.toml) and eval/*.py: each command ended by `run_command`, so a
# torchrun rank cannot abort in interpreter teardown after it reported (see mmcl.distributed).
zeroshot_command = partial(run_command, zeroshot_main)
retrieval_command = partial(run_command, retrieval_main)
knn_command = partial(run_command, knn_main)
linear_probe_command = partial(run_command, linear_probe_main)
