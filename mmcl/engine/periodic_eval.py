"""Evaluation during and after training, through the evaluation library.

Under ZeRO-3 the parameters are partitioned; `full_parameters` gathers them on every rank
for the duration of the evaluation (memory: one full copy of the model), so the model can
be called directly, outside the engine's forward, and each rank encodes its share of the
data. Under ZeRO 1/2 it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from mmcl.config import RunConfig


@contextlib.contextmanager
def full_parameters(engine):
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def evaluate(engine, cfg: RunConfig, tokenizer) -> dict[str, Any]:
    """Zero-shot classification (and retrieval, when configured) of the current weights."""
    if cfg.eval.zeroshot_shards is None and cfg.eval.retrieval_shards is None:
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
        with full_parameters(engine), torch.no_grad():
            def encode_image(pixel_values: torch.Tensor) -> torch.Tensor:
                return model.encode_image(pixel_values.to(device=device, dtype=dtype)).float()

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
