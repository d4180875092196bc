"""Linear probe: multinomial logistic regression on frozen features (CLIP paper protocol).

scikit-learn's L-BFGS `LogisticRegression` (deterministic). The inverse regularisation
strength C is chosen by accuracy on a validation split — given, or carved from the training
set with a fixed seed — and the model is then refit on train + validation with that C.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mmcl.evaluation.metrics import classification_metrics

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def split_train_val(labels: Tensor, val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic random split of sample indices into (train [N-V], val [V]), V >= 1."""
    n = labels.shape[0]
    if n < 2:
        raise ValueError("the linear probe needs at least 2 training samples to carve a validation split.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return order[n_val:].sort().values, order[:n_val].sort().values


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at tiny C / max_iter is expected
        model.fit(features, labels)
    return model


def _scores(model, features: np.ndarray, num_classes: int) -> Tensor:
    """[N, C] decision scores; classes never seen in training score -inf."""
    raw = model.decision_function(features)
    if raw.ndim == 1:  # binary: sklearn returns the score of classes_[1]
        raw = np.stack([-raw, raw], axis=1) / 2
    scores = torch.full((features.shape[0], num_classes), float("-inf"), dtype=torch.float64)
    scores[:, torch.as_tensor(model.classes_, dtype=torch.long)] = torch.as_tensor(raw, dtype=torch.float64)
    return scores


def evaluate_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    val_features: Tensor | None = None,
    val_labels: Tensor | None = None,
    num_classes: int | None = None,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    with_confusion: bool = False,
) -> dict:
    """Fit the probe and report test metrics (acc1, acc5 when C >= 5, mean_per_class_recall)
    plus the chosen "C" and the validation accuracy at that C ("val_acc1").

    features: [N, D]; labels: [N] in [0, num_classes). Without `val_features`, a
    `val_fraction` of the training set (seeded) is the validation split.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if val_features is None:
        fit_index, val_index = split_train_val(train_labels, val_fraction, seed)
        fit_x, fit_y = train_features[fit_index], train_labels[fit_index]
        val_x, val_y = train_features[val_index], train_labels[val_index]
    else:
        fit_x, fit_y, val_x, val_y = train_features, train_labels, val_features, val_labels
    fit_np, fit_y_np = fit_x.double().numpy(), fit_y.long().numpy()
    best_c, best_acc = None, -1.0
    for c in cs:  # strict '>' keeps the smallest C (strongest regularisation) on a tie
        model = _fit(fit_np, fit_y_np, c, max_iter)
        acc = classification_metrics(_scores(model, val_x.double().numpy(), num_classes), val_y)["acc1"]
        if acc > best_acc:
            best_c, best_acc = c, acc
    all_x = torch.cat([fit_x, val_x]).double().numpy()
    all_y = torch.cat([fit_y, val_y]).long().numpy()
    model = _fit(all_x, all_y, best_c, max_iter)
    metrics = classification_metrics(_scores(model, test_features.double().numpy(), num_classes), test_labels, with_confusion)
    metrics["C"] = best_c
    metrics["val_acc1"] = best_acc
    return metrics
