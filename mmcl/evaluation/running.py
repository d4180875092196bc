"""What the evaluation commands share (`mmcl-zeroshot`, `-retrieval`, `-knn`, `-linear-probe`, `mmcl wise-ft --eval`):
joining torchrun's process group, resolving class names and templates, skip totals, and zero-shot
classification of one model on one dataset."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mmcl.distributed import note_joined
from mmcl.evaluation.prompts import builtin_prompt_sets, load_builtin, read_list_file


def setup_distributed(device_arg: str | None) -> torch.device:
    """Join the torchrun process group if there is one; pick this rank's device."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        note_joined()
    return device


def resolve_list(value: str | None, what: str) -> Any:
    """A built-in set's classnames/templates, or a user file's; None when not given."""
    if value is None:
        return None
    if Path(value).exists():
        return read_list_file(value, what)
    if value in builtin_prompt_sets():
        classnames, templates = load_builtin(value)
        return classnames if what == "classnames" else templates
    raise FileNotFoundError(f"--{what} '{value}' is neither a file nor a built-in set ({', '.join(builtin_prompt_sets())}).")


def skipped_counts(*loaders) -> dict:
    """Undecodable samples by reason, summed over loaders and ranks."""
    total: dict[str, int] = {}
    for loader in loaders:
        for reason, count in loader.skipped.items():
            total[reason] = total.get(reason, 0) + count
    return _sum_over_ranks(total)


def zeroshot_metrics(args: argparse.Namespace, model, device: torch.device, data: str,
                     confusion: bool = False) -> tuple[dict, dict]:
    """(metrics, extra) of zero-shot classification of `model` (an EvalModel) on `data`, with the
    class names and templates `args` selects (add_zeroshot_options), else those beside the data."""
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.zeroshot import build_zeroshot_classifier, evaluate_zeroshot

    loader = build_eval_loader(data, model.transform, args.batch_size, args.workers, args.split)
    classnames, templates = (load_builtin(args.prompts) if args.prompts else (None, None))
    classnames = resolve_list(args.classnames, "classnames") or classnames or loader.classnames
    templates = resolve_list(args.templates, "templates") or templates or loader.templates
    if classnames is None:
        raise ValueError("no class names: pass --classnames FILE or a built-in set with --prompts, or put classnames.txt beside the shards.")
    if templates is None:
        templates = ["a photo of a {c}."]
        print("no templates given; using 'a photo of a {c}.'", file=sys.stderr)
    classifier = build_zeroshot_classifier(model.encode_text, classnames, templates, args.text_batch_size)
    images = extract_features(loader, model.encode_image, device=device, desc="images")
    if "label" not in images:
        raise ValueError(f"{data} has no class labels (.cls / label column); zero-shot classification needs them.")
    metrics = evaluate_zeroshot(images["features"], images["label"], classifier, confusion)
    return metrics, {"num_samples": int(images["features"].shape[0]), "skipped": skipped_counts(loader)}


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Sum skip counters over ranks (all_gather_object: a handful of small dicts)."""
    import torch.distributed as dist

    from mmcl.distributed import get_world_size

    if get_world_size() == 1:
        return counts
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, counts)
    total: dict[str, int] = {}
    for part in parts:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + count
    return total
