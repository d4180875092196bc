"""KeyQueue (MoCo v2's FIFO of past keys): contents, pointer and filled after enqueues over
2 gloo ranks (the global batch in rank order, with wrap-around), a global batch larger
than the queue, and the state_dict round trip."""
import sys
from collections import deque
from pathlib import Path

import pytest
import torch

from mmcl.models.queue import KeyQueue

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))  # the shared gloo helper lives there
from gloo_spawn import run_on_gloo_ranks  # noqa: E402

DIM, LOCAL_BATCH = 2, 3


def local_keys(step: int, rank: int, batch: int = LOCAL_BATCH) -> torch.Tensor:
    """Distinguishable keys: row i of rank r at step s is [100 s + 10 r + i, -(100 s + 10 r + i)]."""
    ids = torch.arange(batch, dtype=torch.float32) + 100 * step + 10 * rank
    return torch.stack([ids, -ids], dim=1)


def global_keys(step: int, world_size: int, batch: int = LOCAL_BATCH) -> list[torch.Tensor]:
    """The rows one enqueue adds, in rank order."""
    return [row for rank in range(world_size) for row in local_keys(step, rank, batch)]


def queue_case(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s queue states after each of 4 enqueues (K = 10), one enqueue into K = 4,
    and the state_dict round trip."""
    out: dict[str, torch.Tensor] = {}
    queue = KeyQueue(10, DIM)
    for step in range(1, 5):
        queue.enqueue(local_keys(step, rank))
        out[f"keys{step}"] = queue.keys.clone()
        out[f"current{step}"] = queue.current()
        out[f"pointer{step}"] = torch.tensor(queue.pointer)
        out[f"filled{step}"] = torch.tensor(queue.filled)
        if step == 3:
            state = queue.state_dict()
            restored = KeyQueue(10, DIM)
            restored.load_state_dict(state)
            out.update({f"state/{k}": v for k, v in state.items()})
    restored.enqueue(local_keys(4, rank))
    out["restored_after4"] = restored.keys.clone()
    out["restored_pointer"], out["restored_filled"] = torch.tensor(restored.pointer), torch.tensor(restored.filled)

    small = KeyQueue(4, DIM)
    small.enqueue(local_keys(1, rank))
    out["small_keys"], out["small_pointer"], out["small_filled"] = small.keys.clone(), torch.tensor(small.pointer), torch.tensor(small.filled)
    return out


class RingModel:
    """The expected queue: a ring written one row at a time, plus the plain FIFO of the last K rows."""

    def __init__(self, size: int):
        self.size, self.ring, self.pointer = size, [torch.zeros(DIM)] * size, 0
        self.fifo: deque = deque(maxlen=size)

    def push(self, rows: list[torch.Tensor]) -> None:
        for row in rows:
            self.ring[self.pointer] = row
            self.pointer = (self.pointer + 1) % self.size
            self.fifo.append(row)


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_gloo_ranks(queue_case, 2)


def test_enqueues_over_two_ranks_fill_the_queue_in_rank_order_with_wrap_around(two_ranks):
    model = RingModel(10)
    for step in range(1, 5):
        model.push(global_keys(step, 2))
        filled = min(6 * step, 10)
        for result in two_ranks:  # every rank holds the same queue
            assert torch.equal(result[f"keys{step}"], torch.stack(model.ring))
            assert result[f"pointer{step}"].item() == model.pointer == (6 * step) % 10
            assert result[f"filled{step}"].item() == filled
            current = result[f"current{step}"]
            assert current.shape == (filled, DIM)
            assert torch.equal(current, torch.stack(model.ring[:filled]))
            # oldest first, the storage rolled by the pointer is the FIFO of the last K rows
            if filled == 10:
                assert torch.equal(current.roll(-model.pointer, dims=0), torch.stack(list(model.fifo)))
    # spot-check the wrap-around by hand: step 2 wrote rows 6..9 and then 0..1
    assert torch.equal(two_ranks[0]["keys2"][:2, 0], torch.tensor([211.0, 212.0]))
    assert torch.equal(two_ranks[0]["keys2"][6:, 0], torch.tensor([200.0, 201.0, 202.0, 210.0]))


def test_a_global_batch_larger_than_the_queue_keeps_its_last_rows_in_order(two_ranks):
    model = RingModel(4)
    model.push(global_keys(1, 2))  # 6 rows into 4 slots
    for result in two_ranks:
        assert torch.equal(result["small_keys"], torch.stack(model.ring))
        assert result["small_pointer"].item() == 2 and result["small_filled"].item() == 4
        assert torch.equal(result["small_keys"].roll(-2, dims=0)[:, 0], torch.tensor([102.0, 110.0, 111.0, 112.0]))


def test_state_dict_round_trip(two_ranks):
    for result in two_ranks:
        assert torch.equal(result["state/keys"], result["keys3"])
        assert result["state/pointer"].dtype == torch.long and result["state/pointer"].ndim == 0
        assert result["state/pointer"].item() == 8 and result["state/filled"].item() == 10
        # the restored queue continues exactly like the original
        assert torch.equal(result["restored_after4"], result["keys4"])
        assert result["restored_pointer"] == result["pointer4"] and result["restored_filled"] == result["filled4"]


def test_single_process_enqueue_and_current():
    queue = KeyQueue(5, DIM, dtype=torch.float64)
    assert queue.current().shape == (0, DIM) and queue.keys.dtype == torch.float64
    keys = local_keys(1, 0).double().requires_grad_()
    queue.enqueue(keys * 2)
    assert not queue.keys.requires_grad and queue.pointer == 3 and queue.filled == 3
    assert torch.equal(queue.current(), (keys * 2).detach())
    queue.enqueue(local_keys(2, 0))
    assert queue.pointer == 1 and queue.filled == 5
    assert torch.equal(queue.keys[:, 0], torch.tensor([202.0, 202.0, 204.0, 200.0, 201.0], dtype=torch.float64))
    current = queue.current()
    queue.enqueue(local_keys(3, 0))  # current() is a copy: later enqueues do not change it
    assert current[1, 0].item() == 202.0 and queue.keys[1, 0].item() == 300.0
    assert queue.to("cpu") is queue


def test_bad_sizes_and_shapes_raise():
    with pytest.raises(ValueError, match="size must be at least 1"):
        KeyQueue(0, 4)
    with pytest.raises(ValueError, match="dimension must be at least 1"):
        KeyQueue(4, 0)
    queue = KeyQueue(10, DIM)
    with pytest.raises(ValueError, match=r"keys to enqueue must be \[batch, 2\]"):
        queue.enqueue(torch.zeros(3, DIM + 1))
    with pytest.raises(ValueError, match=r"the saved queue has shape \(8, 2\) but this run's queue is \(10, 2\)"):
        queue.load_state_dict(KeyQueue(8, DIM).state_dict())
    with pytest.raises(ValueError, match="lacks pointer"):
        queue.load_state_dict({"keys": torch.zeros(10, DIM), "filled": torch.tensor(0)})
