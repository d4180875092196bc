import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from mmcl.evaluation.metrics import classification_metrics, confusion_matrix, mean_per_class_recall, topk_accuracy


def test_top1_top5_on_hand_built_scores():
    # 6 classes; row i's label sits at rank i (0-based) of its scores.
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]]).repeat(6, 1)
    labels = torch.arange(6)
    metrics = classification_metrics(scores, labels)
    assert metrics["acc1"] == pytest.approx(1 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)
    assert topk_accuracy(scores, labels, 3) == pytest.approx(3 / 6)


def test_ties_are_broken_by_lower_class_index():
    scores = torch.zeros(2, 6)  # all classes tie: ranking is 0, 1, 2, ...
    metrics = classification_metrics(scores, torch.tensor([0, 5]))
    assert metrics["acc1"] == 0.5  # label 0 wins the tie, label 5 comes last
    assert metrics["acc5"] == 0.5


def test_fewer_than_five_classes_has_no_top5():
    metrics = classification_metrics(torch.eye(4), torch.arange(4))
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0}


def test_mean_per_class_recall_skips_classes_absent_from_labels():
    # Classes 0 and 1 present (class 2 absent): recall 2/3 for class 0 and 0/1 for class 1.
    predictions = torch.tensor([0, 0, 2, 0])
    labels = torch.tensor([0, 0, 0, 1])
    assert mean_per_class_recall(predictions, labels, num_classes=3) == pytest.approx((2 / 3 + 0) / 2)
    assert mean_per_class_recall(predictions, labels, 3) == pytest.approx(balanced_accuracy_score(labels, predictions))


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 2)
    assert matrix.tolist() == [[0, 1], [1, 1]]
    metrics = classification_metrics(torch.tensor([[0.0, 1], [0, 1], [1, 0]]), torch.tensor([0, 1, 1]), with_confusion=True)
    assert metrics["confusion_matrix"] == [[0, 1], [1, 1]]


def test_label_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(torch.zeros(1, 3), torch.tensor([3]))
