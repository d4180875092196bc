"""Evaluation during and after training, through the evaluation library.

Zero-shot classification (`eval.zeroshot_shards`) and retrieval (`eval.retrieval_shards`)
for image-text runs; a weighted kNN classifier (`eval.knn_train_shards` as neighbours,
`eval.knn_test_shards` classified) and optionally a linear probe for any run. kNN and the
probe use the exported image encoder's features, `model.encode_image` (tower -> pooling ->
projection, normalised): the figures equal what `mmcl-knn --model <output_dir>/model` reports.
In image-only (SimCLR/BYOL) runs the projection is `none`, so these are the pooled tower
("backbone") features, as in solo-learn.

Under ZeRO-3 the parameters are partitioned; `full_parameters` gathers them on every rank
for the duration of the evaluation (memory: one full copy of the model), so the model can
be called directly, outside the engine's forward, and each rank encodes its share of the
data. For the evaluation it also lifts ZeRO-3's per-module forward hooks (DeepSpeed's
`unwrap_model_for_generation`): they would re-partition the parameters after each call and
all-gather them again on the next, a collective that hangs when ranks encode different
numbers of batches (evaluation shards rarely split evenly). Under ZeRO 1/2 it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from mmcl.config import RunConfig


@contextlib.contextmanager
def full_parameters(engine, hooks: bool = True):
    """Whole (read-only) parameters on every rank; with `hooks=False`, also no ZeRO-3 forward
    hooks, so each rank may call the model any number of times (see the module docstring)."""
    if engine.zero_optimization_stage() != 3:
        yield
    elif hooks:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield


def evaluate(engine, cfg: RunConfig, tokenizer) -> dict[str, Any]:
    """Zero-shot classification, retrieval and kNN / linear probe (those configured) of the current weights."""
    if cfg.eval.zeroshot_shards is None and cfg.eval.retrieval_shards is None and cfg.eval.knn_train_shards is None:
        return {}
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.loading import eval_transform, text_encoder
    from mmcl.evaluation.prompts import read_list_file
    from mmcl.evaluation.retrieval import encode_retrieval_data, retrieval_metrics
    from mmcl.evaluation.zeroshot import zeroshot_classification

    model = engine.module.model
    device = engine.device
    dtype = next(model.parameters()).dtype
    transform = eval_transform(cfg.data.image_size, cfg.data.image_mean, cfg.data.image_std)
    results: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        with full_parameters(engine, hooks=False), torch.no_grad():
            def encode_image(pixel_values: torch.Tensor) -> torch.Tensor:
                return model.encode_image(pixel_values.to(device=device, dtype=dtype)).float()

            if cfg.eval.knn_train_shards is not None:
                results.update(_knn_and_probe(cfg, encode_image, transform, device))
            if cfg.model.text is None:
                return results
            encode_text = text_encoder(model, tokenizer, cfg.model.text.context_length, device)
            if cfg.eval.zeroshot_shards is not None:
                loader = build_eval_loader(cfg.eval.zeroshot_shards, transform, batch_size=cfg.eval.batch_size,
                                           max_pixels=cfg.data.max_pixels)
                classnames = read_list_file(cfg.eval.classnames, "classnames") if cfg.eval.classnames else loader.classnames
                templates = read_list_file(cfg.eval.templates, "templates") if cfg.eval.templates else loader.templates
                metrics = zeroshot_classification(encode_image, encode_text, loader, classnames, templates or ["{}"],
                                                  device=device)
                results.update({f"zeroshot/{k}": v for k, v in metrics.items() if isinstance(v, float)})
            if cfg.eval.retrieval_shards is not None:
                loader = build_eval_loader(cfg.eval.retrieval_shards, transform, batch_size=cfg.eval.batch_size,
                                           max_pixels=cfg.data.max_pixels)
                encoded = encode_retrieval_data(loader, encode_image, encode_text, device=device)
                metrics = retrieval_metrics(encoded["image_features"], encoded["text_features"], encoded["text_to_image"])
                results.update({f"retrieval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    finally:
        model.train(was_training)
    return results


def _knn_and_probe(cfg: RunConfig, encode_image, transform, device) -> dict[str, float]:
    """kNN (and linear-probe) metrics of the image features on the configured labelled shards."""
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.features import extract_features
    from mmcl.evaluation.knn import evaluate_knn
    from mmcl.evaluation.linear_probe import evaluate_linear_probe

    splits = {}
    for split, shards in (("train", cfg.eval.knn_train_shards), ("test", cfg.eval.knn_test_shards)):
        loader = build_eval_loader(shards, transform, batch_size=cfg.eval.batch_size, max_pixels=cfg.data.max_pixels)
        splits[split] = extract_features(loader, encode_image, keep=("label",), device=device, desc=f"kNN {split} images")
        if "label" not in splits[split]:
            raise ValueError(f"eval.knn_{split}_shards ({shards}) has no class labels (.cls); kNN needs them.")
    train, test = splits["train"], splits["test"]
    num_classes = int(max(train["label"].max(), test["label"].max())) + 1
    metrics = evaluate_knn(train["features"], train["label"], test["features"], test["label"], num_classes,
                           k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    results = {f"knn/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    if cfg.eval.linear_probe:
        probe = evaluate_linear_probe(train["features"], train["label"], test["features"], test["label"], num_classes=num_classes)
        results.update({f"linear_probe/{k}": float(v) for k, v in probe.items() if isinstance(v, (int, float))})
    return results
