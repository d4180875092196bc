"""Zero-shot classification: class names x prompts -> text classifier -> image scores.

The classifier follows CLIP: every prompt embedding is L2-normalised, the embeddings of a
class are averaged, and the average is renormalised. Scores are cosine similarities
`image_features @ classifier.T` (a logit scale would not change any metric).

`encode_text` is any callable from a list of strings to [P, D] features — for an mmcl
DualEncoder build it with `mmcl.evaluation.loading.text_encoder(model, tokenizer, ...)`,
for the CLI models use `EvalModel.encode_text`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mmcl.distributed import get_rank, get_world_size
from mmcl.evaluation.features import extract_features, gather_variable
from mmcl.evaluation.metrics import classification_metrics
from mmcl.evaluation.prompts import expand_prompts

TextEncoder = Callable[[list[str]], Tensor]


@torch.no_grad()
def encode_texts(encode_text: TextEncoder, texts: Sequence[str], batch_size: int = 256, desc: str = "prompts") -> Tensor:
    """Encode `texts` in batches of `batch_size` and L2-normalise. Returns [P, D] float32 on CPU."""
    parts = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=f"encoding {desc}", unit="batch", disable=get_rank() != 0 or len(batches) < 2):
        parts.append(F.normalize(encode_text(list(texts[start : start + batch_size])).float(), dim=-1).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: TextEncoder,
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    batch_size: int = 256,
    shard_over_ranks: bool = True,
) -> Tensor:
    """Text classifier weights, one unit vector per class.

    templates: shared templates with a `{c}`/`{}` placeholder, or a dict class name -> its own
    prompts (CuPL style; classes may have different numbers of prompts).
    With a process group and `shard_over_ranks`, each rank encodes a contiguous slice of the
    prompts and the slices are all-gathered, so every rank ends with the whole classifier.
    Returns [C, D] float32 on CPU (note: open_clip's `build_zero_shot_classifier` returns [D, C]).
    """
    texts, class_ids = expand_prompts(classnames, templates)
    world_size, rank = get_world_size(), get_rank()
    if shard_over_ranks and world_size > 1:
        per_rank = math.ceil(len(texts) / world_size)
        local = encode_texts(encode_text, texts[rank * per_rank : (rank + 1) * per_rank], batch_size)
        dim = _feature_dim(encode_text, local)
        if local.numel() == 0:
            local = torch.zeros(0, dim)
        embeddings = gather_variable(local)  # rank order == prompt order (contiguous slices)
    else:
        embeddings = encode_texts(encode_text, texts, batch_size)
    ids = torch.tensor(class_ids)
    sums = torch.zeros(len(classnames), embeddings.shape[1]).index_add_(0, ids, embeddings)
    counts = torch.bincount(ids, minlength=len(classnames)).clamp_min(1)
    return F.normalize(sums / counts[:, None], dim=-1)


def _feature_dim(encode_text: TextEncoder, local: Tensor) -> int:
    """Feature width for a rank that got no prompts (more ranks than prompts): ask the encoder."""
    return local.shape[1] if local.numel() else encode_text(["x"]).shape[-1]


def zeroshot_scores(image_features: Tensor, classifier: Tensor) -> Tensor:
    """Cosine scores [N, C] from normalised image features [N, D] and a classifier [C, D]."""
    return image_features.float() @ classifier.float().T


def evaluate_zeroshot(
    image_features: Tensor, labels: Tensor, classifier: Tensor, with_confusion: bool = False
) -> dict:
    """Metrics (acc1, acc5 when C >= 5, mean_per_class_recall) of the classifier on features.

    image_features: [N, D] normalised; labels: [N]; classifier: [C, D].
    """
    return classification_metrics(zeroshot_scores(image_features, classifier), labels, with_confusion)


def zeroshot_classification(
    encode_image: Callable[[Tensor], Tensor],
    encode_text: TextEncoder,
    batches: Iterable[dict],
    classnames: Sequence[str],
    templates: Sequence[str] | Mapping[str, Sequence[str]],
    device: torch.device | str = "cpu",
    text_batch_size: int = 256,
    with_confusion: bool = False,
) -> dict:
    """End to end: build the classifier, encode the images (sharded over ranks), score.

    batches: dicts with "pixel_values" [B, 3, H, W], "label" [B] and "index" [B] (dataset order);
    under a process group each rank iterates only its share. Returns the metrics dict, the
    same on every rank.
    """
    classifier = build_zeroshot_classifier(encode_text, classnames, templates, text_batch_size)
    images = extract_features(batches, encode_image, keep=("label",), device=device, desc="images")
    if "label" not in images:
        raise ValueError("the evaluation data has no class labels (.cls); zero-shot classification needs them.")
    return evaluate_zeroshot(images["features"], images["label"], classifier, with_confusion)
