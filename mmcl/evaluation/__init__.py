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
from __future__ import annotations

from mmcl.lazy import lazy_names

# Imported on first use, so that `mmcl.config` (which reads this package's settings) imports no torch.
_LAZY = {
    "extract_features": "mmcl.evaluation.features",
    "gather_in_order": "mmcl.evaluation.features",
    "gather_variable": "mmcl.evaluation.features",
    "evaluate_knn": "mmcl.evaluation.knn",
    "knn_scores": "mmcl.evaluation.knn",
    "evaluate_linear_probe": "mmcl.evaluation.linear_probe",
    "classification_metrics": "mmcl.evaluation.metrics",
    "confusion_matrix": "mmcl.evaluation.metrics",
    "mean_per_class_recall": "mmcl.evaluation.metrics",
    "topk_accuracy": "mmcl.evaluation.metrics",
    "builtin_prompt_sets": "mmcl.evaluation.prompts",
    "expand_prompts": "mmcl.evaluation.prompts",
    "fill_template": "mmcl.evaluation.prompts",
    "load_builtin": "mmcl.evaluation.prompts",
    "read_list_file": "mmcl.evaluation.prompts",
    "dense_retrieval_ranks": "mmcl.evaluation.retrieval",
    "encode_retrieval_data": "mmcl.evaluation.retrieval",
    "recall_at_k": "mmcl.evaluation.retrieval",
    "retrieval_metrics": "mmcl.evaluation.retrieval",
    "retrieval_ranks": "mmcl.evaluation.retrieval",
    "build_zeroshot_classifier": "mmcl.evaluation.zeroshot",
    "encode_texts": "mmcl.evaluation.zeroshot",
    "evaluate_zeroshot": "mmcl.evaluation.zeroshot",
    "zeroshot_classification": "mmcl.evaluation.zeroshot",
    "zeroshot_scores": "mmcl.evaluation.zeroshot",
}

__all__ = [
    "build_zeroshot_classifier", "builtin_prompt_sets", "classification_metrics", "confusion_matrix",
    "dense_retrieval_ranks", "encode_retrieval_data", "encode_texts", "evaluate_knn", "evaluate_linear_probe",
    "evaluate_zeroshot", "expand_prompts", "extract_features", "fill_template", "gather_in_order", "gather_variable",
    "knn_scores", "load_builtin", "mean_per_class_recall", "read_list_file", "recall_at_k", "retrieval_metrics",
    "retrieval_ranks", "topk_accuracy", "zeroshot_classification", "zeroshot_scores",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
