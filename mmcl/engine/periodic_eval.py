"""Evaluation during and after training, through the evaluation library.

Zero-shot classification (`eval.zeroshot_shards`) and retrieval (`eval.retrieval_shards`)
for image-text runs; a weighted kNN classifier (`eval.knn_train_shards` as neighbours,
`eval.knn_test_shards` classified) and optionally a linear probe for any run. kNN and the
probe use the exported image encoder's features, `model.encode_image` (tower -> pooling ->
projection, normalised): the figures equal what `mmcl-knn --model <output_dir>/model` reports.
In image-only (SimCLR/BYOL) runs the projection is `none`, so these are the pooled tower
("backbone") features, as in solo-learn.

`eval.benchmark` (a task list, with `eval.benchmark_root`) scores every task of the list whose dataset
is under the root, as `mmcl benchmark` does, and logs each task's main metric as `benchmark/<dataset>`
(`benchmark/<dataset>/linear_probe[_<shots>shot]` for probes) and their mean as `benchmark/average`.

Under ZeRO-3 the parameters are partitioned; `mmcl.engine.zero.full_parameters(hooks=False)`
gathers them on every rank for the duration of the evaluation, so the model can be called
directly, outside the engine's forward, and each rank encodes its share of the data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmcl.engine.zero import full_parameters
from mmcl.evaluation.settings import entries

if TYPE_CHECKING:
    from mmcl.config import RunConfig


def byte_limits(cfg: RunConfig) -> dict[str, int]:
    """The run's limits on what the shard reader decodes, applied to the evaluation shards too."""
    return {"max_pixels": cfg.data.max_pixels, "max_image_bytes": cfg.data.max_image_bytes,
            "max_text_bytes": cfg.data.max_text_bytes}


def evaluate(engine, cfg: RunConfig, tokenizer) -> dict[str, Any]:
    """Zero-shot classification, retrieval and kNN / linear probe (those configured) of the current weights."""
    if (cfg.eval.zeroshot_shards is None and cfg.eval.retrieval_shards is None and cfg.eval.knn_train_shards is None
            and cfg.eval.benchmark is None):
        return {}
    from mmcl.evaluation.data import build_eval_loader
    from mmcl.evaluation.loading import image_inputs, text_encoder
    from mmcl.evaluation.retrieval import encode_retrieval_data, retrieval_metrics
    from mmcl.evaluation.zeroshot import zeroshot_classification

    model = engine.module.model
    device = engine.device
    dtype = next(model.parameters()).dtype
    transform, unpack = image_inputs(cfg.data)  # square crops, or NaFlex patches at data.naflex.max_num_patches
    results: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        with full_parameters(engine, hooks=False), torch.no_grad():
            def encode_image(pixel_values: torch.Tensor) -> torch.Tensor:
                inputs = unpack(pixel_values.to(device))
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                return model.encode_image(**inputs).float()

            if cfg.eval.knn_train_shards is not None:
                results.update(_knn_and_probe(cfg, encode_image, transform, device))
            if cfg.model.text is None:
                return results
            encode_text = text_encoder(model, tokenizer, cfg.model.text.context_length, device)
            if cfg.eval.zeroshot_shards is not None:
                loader = build_eval_loader(cfg.eval.zeroshot_shards, transform, batch_size=cfg.eval.batch_size,
                                           **byte_limits(cfg))
                classnames = entries(cfg.eval.classnames, "classnames") or loader.classnames
                templates = entries(cfg.eval.templates, "templates") or loader.templates
                metrics = zeroshot_classification(encode_image, encode_text, loader, classnames, templates or ["{}"],
                                                  device=device)
                results.update({f"zeroshot/{k}": v for k, v in metrics.items() if isinstance(v, float)})
            if cfg.eval.retrieval_shards is not None:
                loader = build_eval_loader(cfg.eval.retrieval_shards, transform, batch_size=cfg.eval.batch_size,
                                           **byte_limits(cfg))
                encoded = encode_retrieval_data(loader, encode_image, encode_text, device=device)
                metrics = retrieval_metrics(encoded["image_features"], encoded["text_features"], encoded["text_to_image"])
                results.update({f"retrieval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
            if cfg.eval.benchmark is not None:
                results.update(_benchmark(cfg, encode_image, encode_text, transform, device))
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
        loader = build_eval_loader(shards, transform, batch_size=cfg.eval.batch_size, **byte_limits(cfg))
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


def _benchmark(cfg: RunConfig, encode_image, encode_text, transform, device) -> dict[str, float]:
    """The main metric of each task of eval.benchmark present under eval.benchmark_root, and their mean."""
    import sys

    from mmcl.distributed import get_rank
    from mmcl.evaluation.benchmark_data import read_folder
    from mmcl.evaluation.benchmark_eval import evaluate_task
    from mmcl.evaluation.benchmark_tasks import NOT_IMPLEMENTED, dataset_folder, load_task_list
    from mmcl.evaluation.loading import EvalModel

    _, tasks = load_task_list(cfg.eval.benchmark)
    model = EvalModel(encode_image, encode_text, transform, "training", "training", device)
    results: dict[str, float] = {}
    for task in tasks:
        folder = dataset_folder(cfg.eval.benchmark_root, task) if task.task not in NOT_IMPLEMENTED else None
        if folder is None:
            continue
        try:
            metrics, _ = evaluate_task(task, read_folder(folder), model, cfg.eval.batch_size, 0, **byte_limits(cfg))
        except (ValueError, FileNotFoundError) as error:  # the same on every rank: said once, the run goes on
            if get_rank() == 0:
                print(f"eval.benchmark: {task.dataset} {task.task} not scored: {error}", file=sys.stderr, flush=True)
            continue
        value = metrics.get(task.main_metric)
        if isinstance(value, float):
            suffix = "" if task.task != "linear_probe" else "/linear_probe" + (f"_{task.shots}shot" if task.shots else "")
            results[f"benchmark/{task.short}{suffix}"] = value
    if results:
        results["benchmark/average"] = sum(results.values()) / len(results)
    return results
