"""A FIFO queue of past momentum-encoder keys, MoCo v2's negatives.

The queue holds K keys [K, D] in a ring buffer. Each `enqueue` all-gathers the keys of
every rank (without gradient, in rank order: rank 0's B rows, then rank 1's, ...) and
writes the W*B rows at `pointer`, wrapping around at K, exactly as if they had been
pushed one by one: when W*B > K only the last K rows survive, in order. The queue is
therefore the same on every rank.

It is deliberately a plain object, not an nn.Module: its tensor is neither a parameter
nor a buffer, so DeepSpeed/DDP never see it (no broadcast, no partitioning, no
dtype casting). Save and restore it with `state_dict` / `load_state_dict` next to the
model checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmcl.distributed import all_gather_no_grad


class KeyQueue:
    """A ring buffer of the last `size` keys of the global batch.

    keys: [size, dim] tensor, zeros until written; pointer: the next row to write;
    filled: the number of rows written so far, capped at size.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if size < 1:
            raise ValueError(f"the key queue size must be at least 1, got {size}.")
        if dim < 1:
            raise ValueError(f"the key queue dimension must be at least 1, got {dim}.")
        self.size, self.dim = int(size), int(dim)
        self.keys = torch.zeros(self.size, self.dim, dtype=dtype, device=device)
        self.pointer = 0
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, local_keys: Tensor) -> None:
        """Append the keys of every rank: local_keys [B, dim], the same B on every rank.

        The keys are all-gathered without gradient (identity without a process group),
        detached, converted to the queue's dtype and device and written at `pointer` with
        wrap-around; pointer advances by W*B mod size and filled by W*B (capped at size).
        """
        if local_keys.ndim != 2 or local_keys.shape[1] != self.dim:
            raise ValueError(f"keys to enqueue must be [batch, {self.dim}], got {tuple(local_keys.shape)}.")
        rows = all_gather_no_grad(local_keys.detach()).to(device=self.keys.device, dtype=self.keys.dtype)
        total = rows.shape[0]
        if total == 0:
            return
        kept = rows[-self.size :]  # pushing one by one, only the last `size` rows survive
        start = (self.pointer + total - kept.shape[0]) % self.size
        index = (start + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys[index] = kept
        self.pointer = (self.pointer + total) % self.size
        self.filled = min(self.filled + total, self.size)

    def current(self) -> Tensor:
        """The valid keys, [filled, dim]: all `size` rows once full, in storage order (not
        oldest first; the order does not matter to a contrastive loss). A copy, so the
        queue may be updated before the loss's backward pass."""
        return self.keys[: self.filled].clone()

    def state_dict(self) -> dict[str, Tensor]:
        """{"keys": [size, dim] copy, "pointer": long scalar, "filled": long scalar}."""
        return {
            "keys": self.keys.detach().clone(),
            "pointer": torch.tensor(self.pointer, dtype=torch.long),
            "filled": torch.tensor(self.filled, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`'s output; the keys must have this queue's [size, dim] shape."""
        missing = {"keys", "pointer", "filled"} - set(state)
        if missing:
            raise ValueError(f"the saved queue state lacks {', '.join(sorted(missing))}.")
        keys = state["keys"]
        if tuple(keys.shape) != tuple(self.keys.shape):
            raise ValueError(f"the saved queue has shape {tuple(keys.shape)} but this run's queue is {tuple(self.keys.shape)}.")
        pointer, filled = int(state["pointer"]), int(state["filled"])
        if not (0 <= pointer < self.size and 0 <= filled <= self.size):
            raise ValueError(f"the saved queue's pointer {pointer} and filled {filled} do not fit a queue of size {self.size}.")
        self.keys.copy_(keys)
        self.pointer, self.filled = pointer, filled

    def to(self, device: torch.device | str) -> KeyQueue:
        """Move the keys to `device` (in place); returns self."""
        self.keys = self.keys.to(device)
        return self
