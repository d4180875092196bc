"""Losses across gloo CPU ranks equal the single-process loss over the concatenated batch.

Convention under test (see mmcl/losses/clip.py): mean_r L_r == L; rank r's feature grad
== W * dL/dx_r; mean over ranks of the scale/bias grads == dL/d(scale, bias). Every loss
runs dense and chunked (`chunk_size=CHUNK`, a chunk that divides no batch), on 1, 2 and 4 ranks.
"""

import pytest
import torch

from loss_rank_cases import GATHER_ROWS, GLOBAL_BATCH, gather_input, gather_weights, loss_case, make_batch
from gloo_spawn import run_on_gloo_ranks
from mmcl.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size, is_distributed
from mmcl.losses import clip_loss, siglip_loss

TOL = 1e-10
# Largest |distributed - single-process| gradient entry per (loss form, world size); quoted in notes.
MAX_GRAD_DIFF: dict[tuple[str, int], float] = {}


FORMS = ["clip", "clip_chunked", "siglip", "siglip_chunked"]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"W{w}")
def ranks(request):
    """(world size, per-rank result dicts) from one spawn per world size."""
    return request.param, run_on_gloo_ranks(loss_case, request.param)


def _single_process(kind: str) -> dict[str, torch.Tensor]:
    batch = make_batch()
    x = {k: v.clone().requires_grad_() for k, v in batch.items()}
    if kind == "clip":
        loss = clip_loss(x["img"], x["txt"], x["scale"])
    else:
        loss = siglip_loss(x["img"], x["txt"], x["scale"], x["bias"])
    loss.backward()
    zero = torch.zeros((), dtype=torch.float64)
    return {"loss": loss.detach(), **{f"{k}_grad": (zero if v.grad is None else v.grad) for k, v in x.items()}}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("form", FORMS)
def test_mean_of_rank_losses_equals_single_process_loss(ranks, form):
    world_size, results = ranks
    ref = _single_process(form.split("_")[0])
    mean_loss = torch.stack([r[f"{form}/loss"] for r in results]).mean()
    assert _max_diff(mean_loss, ref["loss"]) < TOL


@pytest.mark.parametrize("form", FORMS)
def test_rank_grads_match_single_process_grads(ranks, form):
    world_size, results = ranks
    ref = _single_process(form.split("_")[0])
    local = GLOBAL_BATCH // world_size
    diffs = []
    for rank, res in enumerate(results):
        rows = slice(rank * local, (rank + 1) * local)
        for key in ("img", "txt"):  # raw feature grads are W x the global-loss grads
            diffs.append(_max_diff(res[f"{form}/{key}_grad"] / world_size, ref[f"{key}_grad"][rows]))
    for key in ("scale", "bias"):  # replicated scalars: the average over ranks is exact
        mean_grad = torch.stack([res[f"{form}/{key}_grad"] for res in results]).mean(0)
        diffs.append(_max_diff(mean_grad, ref[f"{key}_grad"]))
    MAX_GRAD_DIFF[(form, world_size)] = max(diffs)
    print(f"\n[mmcl] max |grad diff| {form} at {world_size} ranks: {max(diffs):.3e}")
    assert max(diffs) < TOL
    # Guard against a vacuous pass: the reference gradients are far from zero.
    assert ref["img_grad"].abs().max() > 1e-3 and ref["scale_grad"].abs() > 1e-3


@pytest.mark.parametrize("kind", FORMS)
def test_rank_accuracies_use_global_candidates_and_rank_offset_labels(ranks, kind):
    world_size, results = ranks
    batch, local = make_batch(), GLOBAL_BATCH // world_size
    sim = batch["img"] @ batch["txt"].T
    labels = torch.arange(GLOBAL_BATCH)
    i2t_hit = (sim.argmax(1) == labels).double()
    t2i_hit = (sim.T.argmax(1) == labels).double()
    for rank, res in enumerate(results):
        rows = slice(rank * local, (rank + 1) * local)
        assert res[f"{kind}/i2t_acc"].item() == pytest.approx(i2t_hit[rows].mean().item(), abs=1e-7)
        assert res[f"{kind}/t2i_acc"].item() == pytest.approx(t2i_hit[rows].mean().item(), abs=1e-7)
    # One-hot features with pair 0 and pair N-1 swapped across the first and last rank.
    for rank, res in enumerate(results):
        misses = (rank == 0) + (rank == world_size - 1)  # both on rank 0 when W == 1
        expected = (local - misses) / local
        assert res[f"onehot_{kind}/i2t_acc"].item() == pytest.approx(expected, abs=1e-7)
        assert res[f"onehot_{kind}/t2i_acc"].item() == pytest.approx(expected, abs=1e-7)


def _as_single_process(results: list[dict[str, torch.Tensor]], form: str) -> dict[str, torch.Tensor]:
    """The ranks' results mapped to what one process computes: mean loss, feature grads / W
    concatenated, mean scale/bias grads (the data-parallel average), all in float64."""
    world_size = len(results)
    out = {"loss": torch.stack([r[f"{form}/loss"] for r in results]).mean()}
    for key in ("img", "txt"):
        out[f"{key}_grad"] = torch.cat([r[f"{form}/{key}_grad"] for r in results]) / world_size
    for key in ("scale", "bias"):
        out[f"{key}_grad"] = torch.stack([r[f"{form}/{key}_grad"] for r in results]).mean(0)
    return {k: v.double() for k, v in out.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype, tol", [("", 1e-10), ("_f32", 1e-5)], ids=["float64", "float32"])
def test_chunked_loss_equals_dense_loss_in_value_and_grads(ranks, kind, dtype, tol):
    world_size, results = ranks
    chunked = _as_single_process(results, f"{kind}_chunked{dtype}")
    dense = _as_single_process(results, f"{kind}{dtype}")
    exact = _single_process(kind)  # float64, one process, dense
    keys = ["loss", "img_grad", "txt_grad", "scale_grad"] + (["bias_grad"] if kind == "siglip" else [])
    for key in keys:
        assert _rel_err(chunked[key], dense[key]) < tol, key
        assert _rel_err(chunked[key], exact[key]) < tol, key
    if kind == "clip":  # softmax ignores the bias: its gradient is exactly zero, not noise
        assert chunked["bias_grad"].item() == 0.0 and dense["bias_grad"].item() == 0.0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", ["", "_f32"], ids=["float64", "float32"])
def test_chunked_accuracies_equal_dense_accuracies(ranks, kind, dtype):
    world_size, results = ranks
    for res in results:
        for metric in ("i2t_acc", "t2i_acc"):
            assert res[f"{kind}_chunked{dtype}/{metric}"].item() == res[f"{kind}{dtype}/{metric}"].item()


def test_issue_616_global_loss_with_gather_grad_gives_world_size_times_feature_grads(ranks):
    """OpenCLIP #616: the global loss on every rank, features gathered with gradient.

    Every rank's feature gradient is W x dL/dx_r - the same raw gradients our local-loss form
    produces (so after data-parallel averaging both give dL/dtheta) but at W x the logits
    compute/memory. OpenCLIP's default gather without gradient (own slice spliced back) gives
    1 x dL/dx_r instead: averaged tower grads come out W x too small against the replicated
    logit scale, whose per-rank grad is the full dL/dtau in both global forms.
    """
    world_size, results = ranks
    ref = _single_process("clip")
    local = GLOBAL_BATCH // world_size
    for rank, res in enumerate(results):
        rows = slice(rank * local, (rank + 1) * local)
        assert _max_diff(res["global_gather_grad/loss"], ref["loss"]) < TOL
        assert _max_diff(res["global_spliced/loss"], ref["loss"]) < TOL
        for key in ("img", "txt"):
            global_grad = res[f"global_gather_grad/{key}_grad"]
            assert _max_diff(global_grad, world_size * ref[f"{key}_grad"][rows]) < TOL
            assert _max_diff(global_grad, res[f"clip/{key}_grad"]) < TOL
            assert _max_diff(res[f"global_spliced/{key}_grad"], ref[f"{key}_grad"][rows]) < TOL
        assert _max_diff(res["global_gather_grad/scale_grad"], ref["scale_grad"]) < TOL
        assert _max_diff(res["global_spliced/scale_grad"], ref["scale_grad"]) < TOL


def test_all_gather_with_grad_concatenates_and_sums_grads(ranks):
    world_size, results = ranks
    expected_values = torch.cat([gather_input(r) for r in range(world_size)])
    weights_sum = sum(gather_weights(world_size, s) for s in range(world_size))
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gather/values"], expected_values, rtol=0, atol=0)
        # d/dx_r of sum_s sum(w_s * gather(x)) = rows r of sum_s w_s
        own = weights_sum[rank * GATHER_ROWS : (rank + 1) * GATHER_ROWS]
        torch.testing.assert_close(res["gather/grad"], own, rtol=0, atol=0)
        torch.testing.assert_close(res["gather_no_grad/values"], expected_values, rtol=0, atol=0)
        if world_size > 1:  # at W == 1 the helper returns its input itself (documented)
            assert not res["gather_no_grad/requires_grad"].item()


def test_helpers_without_process_group_act_as_one_rank():
    assert not is_distributed() and get_rank() == 0 and get_world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x and all_gather_no_grad(x) is x
