"""Tiny models for the export tests: a word-level tokenizer (fixture) and run configs over 2-layer towers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmcl.config import DataConfig, ModelConfig, RunConfig, TextTowerConfig, TowerConfig, save_config

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
WORDS = "a photo of the digit cat dog handwritten written by hand number zero one two three seven".split()
IMAGE = {
    "vit": dict(model_type="vit", image_size=16, patch_size=4, **ENCODER, **NO_DROPOUT),
    "clip_vision_model": dict(model_type="clip_vision_model", image_size=16, patch_size=4, **ENCODER),
    "dinov2": dict(model_type="dinov2", image_size=16, patch_size=4, **ENCODER),
    "convnext": dict(model_type="convnext", num_stages=2, hidden_sizes=[16, 24], depths=[1, 1], patch_size=4),
}
TEXT = {
    "bert": dict(model_type="bert", vocab_size=64, max_position_embeddings=16, **ENCODER, **NO_DROPOUT),
    # CLIP's defaults name ids 49406/49407, outside this vocabulary: the export must align eos with the tokenizer.
    "clip_text_model": dict(model_type="clip_text_model", vocab_size=64, max_position_embeddings=16, **ENCODER),
    "t5": dict(model_type="t5", vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, dropout_rate=0.0),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer: <pad>=0, <unk>=1, <s>=2, </s>=3 around every text (AutoTokenizer folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def run_config(tokenizer_dir: Path | None, image: str = "vit", text: str | None = "bert", image_pooling: str = "cls",
               text_pooling: str = "mean", image_projection: str = "linear", text_projection: str = "linear",
               **model) -> RunConfig:
    """A RunConfig over tiny towers at 16 px; image-only configs train with SimCLR."""
    text_cfg = None
    if text is not None:
        text_cfg = TextTowerConfig(config=dict(TEXT[text]), tokenizer=str(tokenizer_dir), context_length=12,
                                   pooling=text_pooling, projection=text_projection)
    model.setdefault("embed_dim", 24)
    return RunConfig(
        model=ModelConfig(image=TowerConfig(config=dict(IMAGE[image]), pooling=image_pooling, projection=image_projection),
                          text=text_cfg, **model),
        objectives={"clip": 1.0} if text else {"simclr": 1.0},
        data=DataConfig(image_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
    )


def build(config: RunConfig, seed: int = 0):
    """(DualEncoder in eval mode, tokenizer or None) with trained-looking (non-default) heads."""
    from mmcl.models import build_model, build_tokenizer

    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    return model, (build_tokenizer(config.model.text) if config.model.text is not None else None)


def write_run(folder: Path, config: RunConfig, model, tokenizer, metrics: dict | None = None) -> Path:
    """A finished run directory: config.yaml, model/ (mmcl model dir), metrics.json."""
    from mmcl.model_dir import save_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    save_config(config, folder / "config.yaml")
    save_model_dir(model, config, tokenizer, folder / "model")
    (folder / "metrics.json").write_text(json.dumps(metrics or {"zeroshot/acc1": 0.25, "steps": 3, "samples_seen": 96,
                                                                "skipped": {}}))
    return folder
