"""Scoring one benchmark task: zero-shot classification (single- or multi-label), retrieval, linear probe.

The images (and captions) are encoded sharded over the ranks and gathered in dataset order
(`mmcl.evaluation.features`), so every rank ends with the same metrics, equal to one process's.
Metrics and their names are CLIP_benchmark's (`clip_benchmark.metrics.*`, 1.6.2):
- single-label: acc1, acc5 (>= 5 classes), mean_per_class_recall (`mmcl.evaluation.metrics`);
- multi-label (dataset_type.txt = multilabel): mean_average_precision, the mean over classes of the
  average precision of the ranking of all images by that class's score;
- retrieval: image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> any of its
  captions) for k = 1, 5, 10, plus DataComp's mean_recall@1 (their mean at k = 1);
- DataComp's F1-macro_all (iWildCam): macro F1 over the classes present in the labels (WILDS' F1).
"""
from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
from torch import Tensor

from mmcl.evaluation.benchmark_data import DatasetFolder, benchmark_loader
from mmcl.evaluation.benchmark_tasks import Task

RETRIEVAL_KS = (1, 5, 10)
DEFAULT_TEMPLATES = ["a photo of a {c}."]


class ImageTextModel(Protocol):
    """What scoring needs of a model (`mmcl.evaluation.loading.EvalModel` is one)."""

    transform: Any  # PIL image -> tensor
    device: torch.device

    def encode_image(self, pixel_values: Tensor) -> Tensor: ...  # [B, ...] -> [B, D] normalised

    def encode_text(self, texts: list[str]) -> Tensor: ...  # B strings -> [B, D] normalised


def average_precision_per_class(scores: Tensor, targets: Tensor) -> Tensor:
    """[C] average precision of each class (CLIP_benchmark's `average_precision_per_class`).

    scores: [N, C]; targets: [N, C] 0/1. For class k the images are ranked by score (descending, ties by
    the lower index); AP = sum of the precision at each positive's rank / number of positives (0 without any).
    """
    n = scores.shape[0]
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ap = torch.zeros(scores.shape[1], dtype=torch.float64)
    for k in range(scores.shape[1]):
        order = torch.sort(scores[:, k], descending=True, stable=True).indices
        truth = targets[order, k].double()
        precision = truth.cumsum(0) / ranks
        ap[k] = precision[truth.bool()].sum() / max(float(truth.sum()), 1.0)
    return ap


def macro_f1(predictions: Tensor, labels: Tensor) -> float:
    """Macro F1 over the classes present in `labels` (WILDS' F1(average="macro"), DataComp's F1-macro_all)."""
    from sklearn.metrics import f1_score

    present = sorted(set(labels.tolist()))
    return float(f1_score(labels.numpy(), predictions.numpy(), average="macro", labels=present, zero_division=0))


def evaluate_task(task: Task, folder: DatasetFolder, model: ImageTextModel, batch_size: int = 64, workers: int = 0,
                  **limits: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, extra) of `task` on the dataset in `folder`; extra holds num_samples and skipped counts.

    Raises ValueError / FileNotFoundError (one sentence) for a folder that cannot serve the task.
    """
    if task.task == "zeroshot_classification":
        return _zeroshot(task, folder, model, batch_size, workers, limits)
    if task.task == "zeroshot_retrieval":
        return _retrieval(folder, model, batch_size, workers, limits)
    if task.task == "linear_probe":
        return _linear_probe(task, folder, model, batch_size, workers, limits)
    raise ValueError(f"task '{task.task}' is not scored by mmcl benchmark.")


def _zeroshot(task: Task, folder: DatasetFolder, model: ImageTextModel, batch_size: int, workers: int,
              limits: dict) -> tuple[dict, dict]:
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.metrics import classification_metrics
    from mmcl.evaluation.running import skipped_counts
    from mmcl.evaluation.zeroshot import build_zeroshot_classifier, zeroshot_scores

    if folder.kind == "retrieval":
        raise ValueError(f"{folder.path} is a retrieval dataset (dataset_type.txt); use task zeroshot_retrieval.")
    if not folder.classnames:
        raise ValueError(f"{folder.path} has no classnames.txt; zero-shot classification needs the class names.")
    templates = folder.templates
    if not templates:
        print(f"{folder.path}: no zeroshot_classification_templates.txt; using '{DEFAULT_TEMPLATES[0]}'", file=sys.stderr)
        templates = DEFAULT_TEMPLATES
    loader = benchmark_loader(folder, "test", model.transform, batch_size, workers, **limits)
    classifier = build_zeroshot_classifier(model.encode_text, folder.classnames, templates)
    images = extract_features(loader, model.encode_image, keep=("label",), device=model.device, desc=task.name)
    if "label" not in images:
        raise ValueError(f"{folder.path} has no labels (.cls / .npy); zero-shot classification needs them.")
    scores, labels = zeroshot_scores(images["features"], classifier), images["label"]
    if labels.ndim == 2:
        if labels.shape[1] != scores.shape[1]:
            raise ValueError(f"{folder.path}: the multi-label vectors have {labels.shape[1]} entries for "
                             f"{scores.shape[1]} class names.")
        metrics: dict[str, Any] = {"mean_average_precision": average_precision_per_class(scores, labels).mean().item()}
    else:
        metrics = classification_metrics(scores, labels)
        if task.main_metric == "F1-macro_all":
            metrics["F1-macro_all"] = macro_f1(scores.argmax(dim=1), labels)
    return metrics, {"num_samples": int(labels.shape[0]), "skipped": skipped_counts(loader)}


def _retrieval(folder: DatasetFolder, model: ImageTextModel, batch_size: int, workers: int,
               limits: dict) -> tuple[dict, dict]:
    from mmcl.evaluation.retrieval import encode_retrieval_data, retrieval_metrics
    from mmcl.evaluation.running import skipped_counts

    loader = benchmark_loader(folder, "test", model.transform, batch_size, workers, **limits)
    data = encode_retrieval_data(loader, model.encode_image, model.encode_text, model.device)
    metrics = retrieval_metrics(data["image_features"], data["text_features"], data["text_to_image"], RETRIEVAL_KS)
    metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    return metrics, {"num_samples": int(data["image_features"].shape[0]),
                     "num_captions": int(data["text_features"].shape[0]), "skipped": skipped_counts(loader)}


def first_shots(labels: Tensor, shots: int) -> Tensor:
    """Indices of the first `shots` samples of each class, in dataset order. labels: [N] -> [<= C * shots]."""
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(labels.tolist()):
        if taken.get(label, 0) < shots:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _linear_probe(task: Task, folder: DatasetFolder, model: ImageTextModel, batch_size: int, workers: int,
                  limits: dict) -> tuple[dict, dict]:
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.linear_probe import evaluate_linear_probe
    from mmcl.evaluation.running import skipped_counts

    if folder.kind != "classification":
        raise ValueError(f"{folder.path} is a {folder.kind} dataset; the linear probe needs single labels (.cls).")
    splits, loaders = {}, []
    for split in ("train", "test"):
        loader = benchmark_loader(folder, split, model.transform, batch_size, workers, **limits)
        splits[split] = extract_features(loader, model.encode_image, keep=("label",), device=model.device,
                                         desc=f"{task.name} {split}")
        if "label" not in splits[split]:
            raise ValueError(f"{folder.path}/{split} has no .cls labels; the linear probe needs them.")
        loaders.append(loader)
    train, test = splits["train"], splits["test"]
    if task.shots:
        chosen = first_shots(train["label"], task.shots)
        train = {"features": train["features"][chosen], "label": train["label"][chosen]}
    num_classes = len(folder.classnames) if folder.classnames else None
    metrics = evaluate_linear_probe(train["features"], train["label"], test["features"], test["label"],
                                    num_classes=num_classes)
    return metrics, {"num_train": int(train["label"].shape[0]), "num_test": int(test["label"].shape[0]),
                     "skipped": skipped_counts(*loaders)}
