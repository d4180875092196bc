"""`ssl.sync_batchnorm`: BatchNorm of the SSL heads over the global batch. Over 2 gloo ranks
each rank's output, input gradient and running statistics equal torch's BatchNorm over the
concatenated batch in one process (float64), and the ranks' parameter gradients sum to its."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmcl.models import FloatBatchNorm1d, MLPHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))  # the shared gloo helper lives there
from gloo_spawn import run_on_gloo_ranks  # noqa: E402

ROWS, CHANNELS, WORLD = 5, 6, 2


def inputs(rank: int) -> dict[str, torch.Tensor]:
    """Rank r's rows and the weights of its loss sum(out * loss_weights); different scales per channel."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ROWS, CHANNELS, generator=g, dtype=torch.float64) * torch.arange(1, CHANNELS + 1) + 3 * rank
    return {"x": x, "loss_weights": torch.randn(ROWS, CHANNELS, generator=g, dtype=torch.float64)}


def affine() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(CHANNELS, generator=g, dtype=torch.float64), torch.randn(CHANNELS, generator=g, dtype=torch.float64)


def synced_case(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    norm = FloatBatchNorm1d(CHANNELS, sync=True).double()
    weight, bias = affine()
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    data = inputs(rank)
    x = data["x"].clone().requires_grad_()
    out = norm(x)
    (out * data["loss_weights"]).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "weight_grad": norm.weight.grad, "bias_grad": norm.bias.grad,
            "running_mean": norm.running_mean, "running_var": norm.running_var}


def reference() -> dict[str, torch.Tensor]:
    """torch's own batch norm over all ranks' rows, loss = sum of the ranks' losses."""
    parts = [inputs(rank) for rank in range(WORLD)]
    x = torch.cat([p["x"] for p in parts]).requires_grad_()
    weight, bias = (t.clone().requires_grad_() for t in affine())
    running_mean, running_var = torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64)
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    (out * torch.cat([p["loss_weights"] for p in parts])).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "weight_grad": weight.grad, "bias_grad": bias.grad,
            "running_mean": running_mean, "running_var": running_var}


@pytest.mark.slow
def test_synced_batchnorm_over_two_ranks_equals_batchnorm_over_the_global_batch():
    ranks = run_on_gloo_ranks(synced_case, WORLD)
    expected = reference()
    for rank, got in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(got["out"], expected["out"][rows], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["x_grad"], expected["x_grad"][rows], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_mean"], expected["running_mean"], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_var"], expected["running_var"], rtol=0, atol=1e-12)
    for name in ("weight_grad", "bias_grad"):  # the engine averages these over ranks; their sum is the global gradient
        torch.testing.assert_close(sum(r[name] for r in ranks), expected[name], rtol=0, atol=1e-12)
    # per-rank statistics would differ: the ranks' rows have different means (3 apart)
    local = F.batch_norm(inputs(0)["x"], None, None, *affine(), training=True)
    assert not torch.allclose(local, expected["out"][:ROWS], atol=1e-2)


def test_synced_batchnorm_in_one_process_is_plain_batchnorm_and_eval_uses_running_statistics():
    synced, plain = FloatBatchNorm1d(CHANNELS, sync=True), FloatBatchNorm1d(CHANNELS)
    x = inputs(0)["x"].float()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=1e-6)
    synced.eval()
    plain.eval()
    torch.testing.assert_close(synced(x[:2]), plain(x[:2]), rtol=0, atol=1e-6)  # no collective in eval


def test_heads_pass_sync_to_every_batchnorm():
    head = MLPHead(8, 16, 4, num_layers=3, output_norm=True, sync_batchnorm=True)
    norms = [m for m in head.modules() if isinstance(m, FloatBatchNorm1d)]
    assert len(norms) == 3 and all(m.sync for m in norms)
    assert not any(m.sync for m in MLPHead(8, 16, 4, num_layers=3).modules() if isinstance(m, FloatBatchNorm1d))
