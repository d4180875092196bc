"""Evaluation on frozen features: zero-shot classification, retrieval, kNN, linear probes.

The functions work on feature tensors, so the trainer and the `eval/` commands share them:

    classifier = build_zeroshot_classifier(encode_text, classnames, templates)   # [C, D]
    evaluate_zeroshot(image_features, labels, classifier)       # {"acc1", "acc5", "mean_per_class_recall"}
    retrieval_metrics(image_features, text_features, text_to_image)  # {"image_retrieval_recall@k", ...}
    evaluate_knn(train_x, train_y, test_x, test_y)
    evaluate_linear_probe(train_x, train_y, test_x, test_y)

`extract_features` encodes a loader's images sharded over ranks and gathers them in dataset
order; the command-line front ends live in `mmcl.evaluation.cli`.
"""
from mmcl.evaluation.features import extract_features, gather_in_order, gather_variable
from mmcl.evaluation.knn import evaluate_knn, knn_scores
from mmcl.evaluation.linear_probe import evaluate_linear_probe
from mmcl.evaluation.metrics import classification_metrics, confusion_matrix, mean_per_class_recall, topk_accuracy
from mmcl.evaluation.prompts import builtin_prompt_sets, expand_prompts, fill_template, load_builtin, read_list_file
from mmcl.evaluation.retrieval import (
    dense_retrieval_ranks,
    encode_retrieval_data,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
)
from mmcl.evaluation.zeroshot import (
    build_zeroshot_classifier,
    encode_texts,
    evaluate_zeroshot,
    zeroshot_classification,
    zeroshot_scores,
)

__all__ = [
    "build_zeroshot_classifier", "builtin_prompt_sets", "classification_metrics", "confusion_matrix",
    "dense_retrieval_ranks", "encode_retrieval_data", "encode_texts", "evaluate_knn", "evaluate_linear_probe",
    "evaluate_zeroshot", "expand_prompts", "extract_features", "fill_template", "gather_in_order", "gather_variable",
    "knn_scores", "load_builtin", "mean_per_class_recall", "read_list_file", "recall_at_k", "retrieval_metrics",
    "retrieval_ranks", "topk_accuracy", "zeroshot_classification", "zeroshot_scores",
]
