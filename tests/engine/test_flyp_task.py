"""FLYP in the training task: the batch's class labels reach the clip loss, also through the
feature cache (task.features -> concatenated -> task.combine), and same-class pairs are no negatives."""
import pytest
import torch

from mmcl.config import from_dict
from mmcl.engine.sizes import loss_chunk_size
from mmcl.engine.task import TrainingTask
from mmcl.losses import clip_loss
from mmcl.models import build_model

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
BERT = {"model_type": "bert", "vocab_size": 50, "max_position_embeddings": 8, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LABELS = torch.tensor([0, 1, 0, 2, 1, 0])


def flyp_task(flyp: bool = True, chunk_size=None) -> TrainingTask:
    cfg = from_dict({"model": {"image": {"config": VIT, "pooling": "cls"},
                               "text": {"config": BERT, "tokenizer": "unused-hub-id", "context_length": 8}, "embed_dim": 16},
                     "data": {"captions_from_labels": flyp}, "loss": {"chunk_size": chunk_size},
                     "eval": {"classnames": ["a", "b", "c"]}})
    torch.manual_seed(0)
    return TrainingTask(build_model(cfg.model), cfg.objectives, loss_chunk_size(cfg, 1), cfg).eval()


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(6, 3, 16, 16, generator=g), "input_ids": torch.randint(1, 50, (6, 8), generator=g),
            "attention_mask": torch.ones(6, 8, dtype=torch.long), "labels": LABELS.clone()}


def half(b: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in b.items()}


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["dense", "chunked"])
def test_flyp_task_scores_the_batch_with_same_class_pairs_left_out(chunk_size):
    task, b = flyp_task(chunk_size=chunk_size), batch()
    out = task(b)
    features = task.model(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    args = (features["image_features"].float(), features["text_features"].float(), features["logit_scale"].float())
    assert out["clip"].item() == pytest.approx(clip_loss(*args, labels=LABELS).item(), rel=1e-6)
    assert out["clip"].item() < clip_loss(*args).item()
    assert out["clip/same_label_pairs"].item() == 3 * 2 + 2 * 1
    plain = flyp_task(flyp=False)(b)
    assert plain["clip"].item() == pytest.approx(clip_loss(*args).item(), rel=1e-6) and "clip/same_label_pairs" not in plain


def test_cached_features_carry_the_labels_and_give_the_whole_batch_loss():
    """What feature-cache accumulation does with two micro-batches: encode each, concatenate, combine."""
    task, b = flyp_task(), batch()
    cached = [task.features(half(b, slice(0, 3))), task.features(half(b, slice(3, 6)))]
    assert torch.equal(torch.cat([c["labels"] for c in cached]), LABELS)
    joined = {key: torch.cat([c[key] for c in cached]) if cached[0][key].ndim else cached[0][key] for key in cached[0]}
    assert task.combine(joined)["clip"].item() == pytest.approx(task(b)["clip"].item(), rel=1e-6)


def test_flyp_task_refuses_batches_without_labels():
    b = batch()
    del b["labels"]
    with pytest.raises(ValueError, match="the shards have no .cls files"):
        flyp_task()(b)
