"""Image<->text retrieval recall@k, exact, with memory bounded by a chunk size.

Several captions per image (COCO, Flickr30k): `text_to_image[j]` is the image of caption j.
- image retrieval (text query, CLIP_benchmark's `image_retrieval_recall@k`): caption j is
  a hit at k when its image is among the k best-scoring images;
- text retrieval (image query, `text_retrieval_recall@k`): image i is a hit at k when ANY of
  its captions is among the k best-scoring captions. Images without a caption are not
  queries (they still count as items to retrieve).

Rank of a query = position of its best correct item in the ranking of all items by score,
descending, TIES BROKEN BY THE LOWER ITEM INDEX (a stable sort). Equivalently
    rank = #{items scoring > s*} + #{items scoring == s* with index < i*}
where s* is the best correct score and i* the lowest index of a correct item scoring s*.
Hit at k  <=>  rank < k.

The chunked computation never holds more than `query_chunk x item_chunk` scores. Per chunk
of queries it makes two passes over the items: the first finds s* and i* (only in the item
chunks that hold a correct item), the second counts. Each score block comes from the same
matmul call with the same operands in both passes, so the comparisons are exact — the
result equals `dense_retrieval_ranks` on the same scores.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mmcl.distributed import get_rank, get_world_size
from mmcl.evaluation.features import gather_in_order, max_over_ranks


@torch.no_grad()
def retrieval_ranks(
    queries: Tensor,
    items: Tensor,
    query_ids: Tensor,
    item_ids: Tensor,
    query_chunk: int = 1024,
    item_chunk: int = 16384,
    shard_over_ranks: bool = True,
) -> Tensor:
    """Rank of each query's best correct item (see the module docstring), exact and chunked.

    queries: [Q, D]; items: [I, D] (same device); query_ids: [Q], item_ids: [I] — item i is
    correct for query q when item_ids[i] == query_ids[q].
    With a process group and `shard_over_ranks`, query chunk c is computed by rank c % W and
    the ranks are all-gathered: the same numbers as one process (same matmul blocks).
    Returns [Q] long on CPU; -1 for a query without any correct item.
    """
    if queries.shape[1] != items.shape[1]:
        raise ValueError(f"query and item features differ in width: {queries.shape[1]} vs {items.shape[1]}.")
    device = queries.device
    query_ids, item_ids = query_ids.to(device), item_ids.to(device)
    world_size, rank = (get_world_size(), get_rank()) if shard_over_ranks else (1, 0)
    starts = list(range(0, queries.shape[0], query_chunk))
    mine = starts[rank::world_size]
    item_starts = list(range(0, items.shape[0], item_chunk))
    ranks, positions = [], []
    for start in mine:
        q = queries[start : start + query_chunk]
        q_ids = query_ids[start : start + query_chunk]
        best, best_index = _best_correct(q, q_ids, items, item_ids, item_starts, item_chunk)
        count = torch.zeros(q.shape[0], dtype=torch.long, device=device)
        for item_start in item_starts:
            scores = q @ items[item_start : item_start + item_chunk].T
            count += (scores > best[:, None]).sum(dim=1)
            # Items scoring exactly s*: only those with a lower index than i* rank above it.
            # Beyond the best correct item itself such ties are rare, so the index comparison
            # runs only on the rows that have one.
            equal = scores == best[:, None]
            item_end = item_start + scores.shape[1]
            itself = ((best_index >= item_start) & (best_index < item_end)).long()
            tied = equal.sum(dim=1) > itself
            if tied.any():
                index = torch.arange(item_start, item_end, device=device)
                count[tied] += (equal[tied] & (index[None, :] < best_index[tied, None])).sum(dim=1)
        count[best_index < 0] = -1
        ranks.append(count.cpu())
        positions.append(torch.arange(start, start + q.shape[0]))
    local = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    local_positions = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    if world_size == 1:
        return local
    return gather_in_order({"rank": local}, local_positions)["rank"]


def _best_correct(
    q: Tensor, q_ids: Tensor, items: Tensor, item_ids: Tensor, item_starts: list[int], item_chunk: int
) -> tuple[Tensor, Tensor]:
    """Best correct score s* [q] and the lowest index i* [q] of a correct item scoring s*.

    Queries without a correct item get s* = -inf and i* = -1.
    """
    device = q.device
    best = torch.full((q.shape[0],), float("-inf"), device=device, dtype=q.dtype)
    best_index = torch.full((q.shape[0],), -1, dtype=torch.long, device=device)
    for item_start in item_starts:
        chunk_ids = item_ids[item_start : item_start + item_chunk]
        if not torch.isin(chunk_ids, q_ids).any():
            continue  # no correct item here: skip the matmul
        scores = q @ items[item_start : item_start + item_chunk].T
        correct = q_ids[:, None] == chunk_ids[None, :]
        masked = scores.masked_fill(~correct, float("-inf"))
        chunk_best = masked.max(dim=1).values
        index = torch.arange(item_start, item_start + scores.shape[1], device=device)
        at_best = correct & (masked == chunk_best[:, None])
        chunk_index = torch.where(at_best, index[None, :], torch.iinfo(torch.long).max).min(dim=1).values
        # Chunks come in ascending index order, so on an equal score the earlier chunk's
        # (lower) index stays: only a strictly better score replaces it.
        better = correct.any(dim=1) & ((chunk_best > best) | (best_index < 0))
        best = torch.where(better, chunk_best, best)
        best_index = torch.where(better, chunk_index, best_index)
    return best, best_index


@torch.no_grad()
def dense_retrieval_ranks(queries: Tensor, items: Tensor, query_ids: Tensor, item_ids: Tensor) -> Tensor:
    """Reference implementation of `retrieval_ranks` from the full [Q, I] score matrix.

    Stable descending sort of each row, position of the first correct item; -1 if none.
    """
    scores = queries @ items.T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    correct = item_ids.to(queries.device)[order] == query_ids.to(queries.device)[:, None]
    positions = torch.arange(items.shape[0], device=queries.device).expand_as(correct)
    first = torch.where(correct, positions, items.shape[0]).min(dim=1).values
    first[first == items.shape[0]] = -1
    return first.cpu()


def recall_at_k(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries (those with rank >= 0) whose rank is below k, for each k."""
    valid = ranks[ranks >= 0]
    if valid.numel() == 0:
        raise ValueError("no retrieval query has a correct item; check the image-caption pairing.")
    return {k: (valid < k).sum().item() / valid.numel() for k in ks}


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = 1024,
    item_chunk: int = 16384,
) -> dict[str, float]:
    """CLIP_benchmark's retrieval metrics.

    image_features: [N, D], text_features: [M, D] (normalised, same device), text_to_image: [M]
    long in [0, N). Returns {"image_retrieval_recall@k" (text -> image),
    "text_retrieval_recall@k" (image -> any of its captions)} for k in ks.
    """
    text_to_image = text_to_image.long()
    if text_to_image.numel() != text_features.shape[0]:
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {text_features.shape[0]} captions.")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= image_features.shape[0]):
        raise ValueError(f"text_to_image must point into the {image_features.shape[0]} images.")
    image_ids = torch.arange(image_features.shape[0])
    text_queries = retrieval_ranks(text_features, image_features, text_to_image, image_ids, query_chunk, item_chunk)
    image_queries = retrieval_ranks(image_features, text_features, image_ids, text_to_image, query_chunk, item_chunk)
    metrics = {}
    for k, value in recall_at_k(text_queries, ks).items():
        metrics[f"image_retrieval_recall@{k}"] = value
    for k, value in recall_at_k(image_queries, ks).items():
        metrics[f"text_retrieval_recall@{k}"] = value
    return metrics


_CAPTION_BITS = 8  # caption key = image index << 8 | caption number (at most 256 captions per image)


@torch.no_grad()
def encode_retrieval_data(
    batches,
    encode_image,
    encode_text,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Encode images and all their captions, sharded over ranks, gathered in dataset order.

    batches: dicts with "pixel_values" [B, 3, H, W], "index" [B] and "captions" (B lists of
    strings); encode_image: [B, 3, H, W] -> [B, D]; encode_text: list of strings -> [M, D].
    Returns {"image_features": [N, D], "text_features": [M, D] (captions of image 0 first,
    in their order, then image 1, ...), "text_to_image": [M] long in [0, N)} on CPU.
    """
    from tqdm import tqdm

    images, image_index, texts, text_keys = [], [], [], []
    for batch in tqdm(batches, desc="encoding images+captions", unit="batch", disable=get_rank() != 0):
        if "captions" not in batch:
            raise ValueError("the evaluation data has no captions (.txt); retrieval needs them.")
        images.append(torch.nn.functional.normalize(encode_image(batch["pixel_values"].to(device)).float(), dim=-1).cpu())
        index = torch.as_tensor(batch["index"]).long()
        image_index.append(index)
        flat = [c for captions in batch["captions"] for c in captions]
        keys = []
        for i, captions in zip(index.tolist(), batch["captions"]):
            if len(captions) > 1 << _CAPTION_BITS:
                raise ValueError(f"sample {i} has {len(captions)} captions; at most {1 << _CAPTION_BITS} are supported.")
            keys.extend((i << _CAPTION_BITS) | j for j in range(len(captions)))
        texts.append(torch.nn.functional.normalize(encode_text(flat).float(), dim=-1).cpu())
        text_keys.append(torch.tensor(keys, dtype=torch.long))
    dim = max_over_ranks(images[0].shape[1] if images else 0)
    local_images = torch.cat(images) if images else torch.zeros(0, dim)
    local_texts = torch.cat(texts) if texts else torch.zeros(0, dim)
    empty = torch.zeros(0, dtype=torch.long)
    gathered_images = gather_in_order({"features": local_images}, torch.cat(image_index) if image_index else empty)
    gathered_texts = gather_in_order({"features": local_texts}, torch.cat(text_keys) if text_keys else empty)
    if gathered_images["features"].shape[0] == 0:
        raise RuntimeError("no image-caption pairs could be read; check the data path and the skipped-sample counts.")
    owner = gathered_texts["index"] >> _CAPTION_BITS
    text_to_image = torch.searchsorted(gathered_images["index"], owner)
    return {
        "image_features": gathered_images["features"],
        "text_features": gathered_texts["features"],
        "text_to_image": text_to_image,
    }
