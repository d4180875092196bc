"""Classification metrics on score matrices: top-k accuracy, mean per-class recall, confusion.

Definitions follow CLIP_benchmark (`acc1`, `acc5`, `mean_per_class_recall`):
- top-k accuracy: fraction of samples whose label is among the k highest scores. Ties
  between scores are broken by the lower class index (a stable descending sort), so the
  numbers do not depend on the backend's `topk` implementation.
- mean per-class recall: recall (= accuracy restricted to the samples of that class)
  averaged over the classes PRESENT in `labels`; classes with no sample are left out rather
  than counted as 0, as `sklearn.metrics.balanced_accuracy_score` does.
- top-5 is only reported with at least 5 classes (CLIP_benchmark writes NaN then; we
  leave the key out so JSON stays valid).
"""
from __future__ import annotations

import torch
from torch import Tensor


def ranked_classes(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best classes per row, ties broken by the lower class index.

    scores: [N, C]. Returns [N, min(k, C)] long.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def topk_correct(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """[N] bool: is `labels[i]` among the k best classes of `scores[i]` (ties: lower index first)."""
    return (ranked_classes(scores, k) == labels[:, None]).any(dim=1)


def topk_accuracy(scores: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is in the top-k. scores: [N, C]; labels: [N] long."""
    if scores.shape[0] == 0:
        raise ValueError("cannot compute accuracy on zero samples.")
    return topk_correct(scores, labels, k).sum().item() / scores.shape[0]


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """[C, C] long counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_per_class_recall(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """Recall averaged over the classes that occur in `labels` (absent classes are skipped).

    predictions, labels: [N] long. Equals sklearn's `balanced_accuracy_score(labels, predictions)`.
    """
    confusion = confusion_matrix(predictions, labels, num_classes)
    support = confusion.sum(dim=1)
    present = support > 0
    recall = confusion.diagonal()[present].double() / support[present].double()
    return recall.mean().item()


def classification_metrics(scores: Tensor, labels: Tensor, with_confusion: bool = False) -> dict:
    """CLIP_benchmark-style metrics for single-label classification.

    scores: [N, C] (any monotone score: logits, similarities, votes); labels: [N] in [0, C).
    Returns {"acc1", "acc5" (only when C >= 5), "mean_per_class_recall"[, "confusion_matrix"
    as a C x C list of lists]}.
    """
    if scores.ndim != 2 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be [N, C] and labels [N], got {tuple(scores.shape)} and {tuple(labels.shape)}.")
    num_classes = scores.shape[1]
    labels = labels.long().to(scores.device)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min().item()}..{labels.max().item()}.")
    ranked = ranked_classes(scores, min(5, num_classes))
    hits = ranked == labels[:, None]
    n = max(labels.shape[0], 1)
    # Python division of integer counts: exact fractions, no float32 rounding of the mean.
    metrics = {"acc1": hits[:, :1].any(dim=1).sum().item() / n}
    if num_classes >= 5:
        metrics["acc5"] = hits[:, :5].any(dim=1).sum().item() / n
    predictions = ranked[:, 0]
    metrics["mean_per_class_recall"] = mean_per_class_recall(predictions, labels, num_classes)
    if with_confusion:
        metrics["confusion_matrix"] = confusion_matrix(predictions, labels, num_classes).tolist()
    return metrics
