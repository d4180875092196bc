import torch

from mmcl.evaluation.knn import evaluate_knn, knn_scores
from mmcl.evaluation.linear_probe import evaluate_linear_probe, split_train_val


def _clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + noise * torch.randn(labels.shape[0], dim, generator=generator)
    return torch.nn.functional.normalize(features, dim=-1), labels


def test_knn_votes_are_exp_similarity_over_temperature():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    votes = knn_scores(train, labels, torch.tensor([[1.0, 0.0]]), num_classes=2, k=2, temperature=0.5, train_chunk=1)
    # Two nearest: item 0 (cos 1.0, class 0) and item 2 (cos 0.6, class 1).
    expected = torch.tensor([[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(1.2))]])
    assert torch.allclose(votes, expected)


def test_knn_chunked_over_train_equals_one_chunk():
    train_x, train_y = _clusters(20, 5, 16, 0.8, seed=0)
    test_x, _ = _clusters(6, 5, 16, 0.8, seed=1)
    whole = knn_scores(train_x, train_y, test_x, 5, k=7, train_chunk=10_000)
    chunked = knn_scores(train_x, train_y, test_x, 5, k=7, train_chunk=9, test_chunk=4)
    assert torch.allclose(whole, chunked)


def test_knn_on_separable_clusters_is_perfect():
    train_x, train_y = _clusters(30, 6, 16, 0.05, seed=0)
    test_x, test_y = _clusters(10, 6, 16, 0.05, seed=1)
    metrics = evaluate_knn(train_x, train_y, test_x, test_y)
    assert metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_linear_probe_on_separable_clusters_is_perfect():
    train_x, train_y = _clusters(30, 4, 16, 0.05, seed=0)
    test_x, test_y = _clusters(10, 4, 16, 0.05, seed=1)
    metrics = evaluate_linear_probe(train_x, train_y, test_x, test_y, cs=(0.1, 10.0))
    assert metrics["acc1"] == 1.0 and metrics["mean_per_class_recall"] == 1.0
    assert "acc5" not in metrics  # 4 classes
    assert metrics["C"] == 0.1  # both C separate the clusters: the tie keeps the first (strongest regularisation)


def test_linear_probe_is_deterministic_and_uses_given_validation_split():
    train_x, train_y = _clusters(20, 3, 8, 0.6, seed=0)
    val_x, val_y = _clusters(5, 3, 8, 0.6, seed=2)
    test_x, test_y = _clusters(10, 3, 8, 0.6, seed=1)
    first = evaluate_linear_probe(train_x, train_y, test_x, test_y, val_x, val_y, cs=(0.01, 1.0, 100.0))
    second = evaluate_linear_probe(train_x, train_y, test_x, test_y, val_x, val_y, cs=(0.01, 1.0, 100.0))
    assert first == second
    assert 0.5 < first["acc1"] <= 1.0


def test_validation_split_is_seeded_and_disjoint():
    train, val = split_train_val(torch.zeros(10), 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, split_train_val(torch.zeros(10), 0.2, seed=3)[1])
