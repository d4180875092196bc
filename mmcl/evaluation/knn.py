"""Weighted k-nearest-neighbour classifier on frozen features (solo-learn / InstDisc style).

Cosine similarity to every training feature; the k most similar neighbours vote for their
class with weight exp(similarity / temperature). The train features are visited in chunks
while a running top-k is kept, so memory is bounded by `test_chunk x train_chunk`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.evaluation.metrics import classification_metrics


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    test_chunk: int = 1024,
    train_chunk: int = 16384,
) -> Tensor:
    """Class votes for each test sample.

    train_features: [N, D], train_labels: [N] in [0, C), test_features: [T, D] (normalised
    here, so any scale works). Returns [T, C] float32 votes on CPU: sum over the k nearest
    neighbours of exp(cos / temperature) for the neighbour's class.
    """
    if train_features.shape[0] == 0:
        raise ValueError("the kNN classifier needs at least one training sample.")
    device = test_features.device
    train_features = F.normalize(train_features.float(), dim=-1).to(device)
    test_features = F.normalize(test_features.float(), dim=-1)
    train_labels = train_labels.long().to(device)
    k = min(k, train_features.shape[0])
    votes = []
    for start in range(0, test_features.shape[0], test_chunk):
        query = test_features[start : start + test_chunk]
        top_sim = torch.full((query.shape[0], 0), float("-inf"), device=device)
        top_index = torch.zeros((query.shape[0], 0), dtype=torch.long, device=device)
        for train_start in range(0, train_features.shape[0], train_chunk):
            sim = query @ train_features[train_start : train_start + train_chunk].T
            sim_k, index_k = sim.topk(min(k, sim.shape[1]), dim=1)
            # Merge the running top-k with this chunk's top-k.
            merged_sim = torch.cat([top_sim, sim_k], dim=1)
            merged_index = torch.cat([top_index, index_k + train_start], dim=1)
            top_sim, picked = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
            top_index = merged_index.gather(1, picked)
        weights = (top_sim / temperature).exp()
        one_hot = F.one_hot(train_labels[top_index], num_classes).float()  # [q, k, C]
        votes.append((one_hot * weights[..., None]).sum(dim=1).cpu())
    return torch.cat(votes)


def evaluate_knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    with_confusion: bool = False,
) -> dict:
    """kNN classification metrics (acc1, acc5 when C >= 5, mean_per_class_recall).

    num_classes: defaults to 1 + the largest label in train or test.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return classification_metrics(scores, test_labels, with_confusion)
