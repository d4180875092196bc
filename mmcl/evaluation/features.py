"""Feature extraction over a loader, sharded over ranks, gathered back in dataset order.

Every batch carries an `index` (the sample's position in dataset order, or any int64 key
that sorts that way). Each rank encodes only the batches its loader gives it; the gather
then pads the per-rank tensors to one length, all-gathers them and sorts by `index`. The
result is therefore the same on every rank and the same as one process's, however the
loader split the samples (by shard, by sample, by DataLoader worker).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from mmcl.distributed import all_gather_no_grad, get_rank, get_world_size


def gather_variable(x: Tensor) -> Tensor:
    """Concatenate `x` [n_r, ...] from every rank along dim 0; n_r may differ between ranks.

    Returns [sum_r n_r, ...] with rank 0's rows first. Without a process group returns `x`.
    """
    world_size = get_world_size()
    if world_size == 1:
        return x
    device = comm_device()
    sizes = all_gather_no_grad(torch.tensor([x.shape[0]], device=device)).cpu()
    longest = int(sizes.max())
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    gathered = all_gather_no_grad(padded).reshape(world_size, longest, *x.shape[1:]).to(x.device)
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(world_size)], dim=0)


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    if get_world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_in_order(tensors: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Gather each [n_r, ...] tensor of `tensors` from all ranks and sort rows by `index` [n_r].

    Returns the same keys plus "index", each [N, ...] in ascending index order. A repeated
    index (the same sample seen twice) raises, since it would silently double-count.
    """
    index = gather_variable(index.long())
    order = torch.argsort(index, stable=True)
    if index.numel() > 1 and bool((index[order][1:] == index[order][:-1]).any()):
        raise RuntimeError("the evaluation loader yielded the same sample index twice; check how it splits shards across ranks.")
    out = {name: gather_variable(t)[order.to(t.device)] for name, t in tensors.items()}
    out["index"] = index[order]
    return out


@torch.no_grad()
def extract_features(
    batches: Iterable[dict],
    encode: Callable[[Tensor], Tensor],
    input_key: str = "pixel_values",
    keep: tuple[str, ...] = ("label",),
    device: torch.device | str = "cpu",
    desc: str = "images",
    total: int | None = None,
) -> dict[str, Tensor]:
    """Encode every batch on this rank and gather the results from all ranks in dataset order.

    batches: dicts with `input_key` [B, ...], "index" [B] and the keys in `keep` ([B, ...]
    tensors, e.g. "label"); keys missing from the batches are dropped from the output.
    encode: [B, ...] -> [B, D] (normalised features, e.g. `model.encode_image`).
    Returns {"features": [N, D] float32 on CPU, "index": [N], <kept keys>: [N, ...]}.
    """
    features, indices = [], []
    kept: dict[str, list[Tensor]] = {key: [] for key in keep}
    show = get_rank() == 0
    for batch in tqdm(batches, desc=f"encoding {desc}", unit="batch", total=total, disable=not show):
        features.append(encode(batch[input_key].to(device)).float().cpu())
        indices.append(torch.as_tensor(batch["index"]).long())
        for key in keep:
            if key in batch:
                kept[key].append(torch.as_tensor(batch[key]))
    # A rank whose share of the data is empty still joins every gather, with the same keys
    # and feature width as its peers (learned by a MAX all-reduce).
    dim = max_over_ranks(features[0].shape[1] if features else 0)
    local = {"features": torch.cat(features) if features else torch.zeros(0, dim)}
    for key, parts in kept.items():
        if max_over_ranks(int(bool(parts))):
            local[key] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    out = gather_in_order(local, index)
    if out["features"].shape[0] == 0:
        raise RuntimeError(f"no {desc} could be read; check the data path and the skipped-sample counts.")
    return out


def max_over_ranks(value: int) -> int:
    """The maximum of an int over all ranks (the value itself without a process group)."""
    if get_world_size() == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
