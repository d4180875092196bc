"""MoCo, SimSiam, triplet and the cross-modal queue in the training task: what they read, the key
encoder and queues kept outside the optimizer, the queue's contents in order (with wrap-around),
and an exact resume (bit-equal next losses) from the saved state."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import ConfigError, from_dict
from mmcl.engine.sizes import loss_chunk_size
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model
from mmcl.objectives import needs_of
from mmcl.objectives.moco import MoCoObjective
from test_objectives import BERT, VIT, batch

HEADS = {"moco": {"hidden_dim": 24, "out_dim": 8, "queue_size": 10, "base_momentum": 0.9},
         "simsiam": {"hidden_dim": 24, "out_dim": 16, "predictor_hidden_dim": 8},
         "triplet": {"hidden_dim": 24, "out_dim": 8}}


def config(objectives: dict, text: bool = False, ssl: dict | None = None, loss: dict | None = None):
    model = {"image": {"config": VIT, "pooling": "cls", "projection": "linear" if text else "none"}, "embed_dim": 32}
    if text:
        model["text"] = {"config": BERT, "tokenizer": "unused-hub-id", "context_length": 8}
    return from_dict({"model": model, "objectives": objectives, "ssl": {**HEADS, **(ssl or {})}, "loss": loss or {}})


def task_for(cfg, seed: int = 0) -> TrainingTask:
    torch.manual_seed(seed)
    return TrainingTask(build_model(cfg.model), cfg.objectives, loss_chunk_size(cfg, 1), cfg)


def test_what_each_objective_reads():
    assert needs_of(["moco"]) == needs_of(["simsiam"]) == needs_of(["triplet"]) == {"views"}
    assert needs_of(["clip_queue"]) == {"pixel_values", "text"}
    image_text = config({"triplet": 1.0}, text=True, ssl={"triplet": {"pairs": "image_text"}})
    assert needs_of(["triplet"], image_text) == {"pixel_values", "text"}
    assert task_for(image_text).needs == {"pixel_values", "text"}


def test_moco_queue_holds_the_normalised_keys_of_each_batch_in_order_with_wrap_around():
    task = task_for(config({"moco": 1.0}))
    moco: MoCoObjective = task.objectives["moco"]
    assert moco.queue.filled == 10 and torch.allclose(moco.queue.keys.norm(dim=-1), torch.ones(10))  # random unit keys
    key_ids = {id(p) for p in moco.momentum.target.parameters()}
    assert key_ids and not key_ids & {id(p) for p in task.parameters()}
    first, second = batch(seed=1), batch(seed=2)  # 4 images: 8 keys per batch
    keys1 = F.normalize(moco.encode_keys(first["views"]), dim=-1)
    out = task({"views": first["views"]})
    assert torch.equal(moco.queue.keys[:8], keys1) and moco.queue.pointer == 8
    keys2 = F.normalize(moco.encode_keys(second["views"]), dim=-1)
    task({"views": second["views"]})
    assert torch.equal(moco.queue.keys[8:10], keys2[:2]) and torch.equal(moco.queue.keys[:6], keys2[2:])
    assert torch.equal(moco.queue.keys[6:8], keys1[6:8]) and moco.queue.pointer == 6
    out["loss"].backward()  # the queue changed after the loss: its snapshot was taken first
    assert all(p.grad is None for p in moco.momentum.target.parameters())
    assert moco.projector.layers[0].weight.grad.abs().sum() > 0


def test_moco_v3_uses_the_batch_keys_and_a_predictor():
    task = task_for(config({"moco": 1.0}, ssl={"moco": {**HEADS["moco"], "queue_size": 0, "predictor": True}}))
    moco = task.objectives["moco"]
    assert moco.queue is None and moco.predictor is not None and moco.loss.scale_by_temperature
    out = task({"views": batch()["views"]})
    assert set(out) == {"loss", "moco", "moco/acc"} and out["loss"] > 0
    assert all(key.startswith("moco.momentum.") for key in task.extra_state())


def test_simsiam_and_triplet_train_their_heads():
    task = task_for(config({"simsiam": 1.0, "triplet": 0.5}))
    out = task({"views": batch()["views"]})
    assert -1 <= out["simsiam"] <= 1 and out["simsiam"].item() == pytest.approx(-out["simsiam/cos"].item())
    assert 0 <= out["triplet/active"] <= 1
    out["loss"].backward()
    for head in (task.objectives["simsiam"].predictor, task.objectives["simsiam"].projector, task.objectives["triplet"].head):
        assert head.layers[0].weight.grad.abs().sum() > 0
    assert task.extra_state() == {}


def _train(task, optimizer, batches, first_step: int, total: int) -> list[float]:
    losses = []
    for offset, b in enumerate(batches):
        out = task(b)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.after_optimizer_step(first_step + offset, total)
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("objectives, text", [({"moco": 1.0}, False), ({"clip_queue": 1.0}, True)])
def test_resume_from_saved_state_gives_bit_equal_losses_queue_and_momentum_encoder(objectives, text):
    cfg = config(objectives, text=text, loss={"clip_queue": {"size": 6, "base_momentum": 0.9}})
    batches = [batch(seed=10 + i) for i in range(5)]
    task = task_for(cfg)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    _train(task, optimizer, batches[:3], 1, 5)
    saved = ({k: v.clone() for k, v in task.state_dict().items()}, copy.deepcopy(optimizer.state_dict()),
             {k: v.clone() for k, v in task.extra_state().items()}, torch.get_rng_state())  # BERT has dropout
    expected = _train(task, optimizer, batches[3:], 4, 5)

    resumed = task_for(cfg, seed=1)  # different initial weights, queues and momentum encoders
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved[1])
    resumed.load_extra_state(saved[2])
    torch.set_rng_state(saved[3])
    assert _train(resumed, resumed_optimizer, batches[3:], 4, 5) == expected  # bit-equal
    final, continued = task.extra_state(), resumed.extra_state()
    assert final.keys() == continued.keys() and all(torch.equal(final[k], continued[k]) for k in final)
    queue_keys = [k for k in final if "queue." in k and k.endswith("pointer")]
    assert queue_keys and any(not torch.equal(saved[2][k], final[k]) for k in final)
    with pytest.raises(ValueError, match="queue|does not match"):
        task_for(config(objectives, text=text, ssl={"moco": {**HEADS["moco"], "queue_size": 7}},
                        loss={"clip_queue": {"size": 7}})).load_extra_state(saved[2])


def test_clip_queue_with_an_empty_queue_is_the_clip_loss():
    cfg = config({"clip_queue": 1.0}, text=True)
    task, clip = task_for(cfg).eval(), task_for(config({"clip": 1.0}, text=True)).eval()  # eval: no dropout
    b = batch()
    assert task(b)["loss"].item() == pytest.approx(clip(b)["loss"].item(), rel=1e-6)
    second = task(b)  # now 4 queued negatives per side
    assert second["clip_queue/negatives"].item() == 4 + 4 - 1


@pytest.mark.parametrize("override, message", [
    ({"objectives": {"clip_queue": 1.0}, "loss": {"chunk_size": 4}}, "computes its loss densely"),
    ({"objectives": {"clip_queue": 1.0, "clip": 1.0}}, "use it instead"),
    ({"objectives": {"moco": 1.0}, "ssl": {"moco": {"queue_size": -1}}}, "queue_size"),
    ({"objectives": {"moco": 1.0}, "ssl": {"moco": {"base_momentum": 1.5}}}, "ssl.moco.base_momentum"),
    ({"objectives": {"triplet": 1.0}, "ssl": {"triplet": {"mining": "hardest"}}}, "must be one of"),
    ({"objectives": {"triplet": 1.0}, "ssl": {"triplet": {"margin": -0.1}}}, "margin"),
])
def test_config_mistakes_get_one_sentence_errors(override, message):
    text = "clip_queue" in override["objectives"]
    model = {"image": {"config": VIT, "projection": "linear" if text else "none"}, "embed_dim": 32}
    if text:
        model["text"] = {"config": BERT, "tokenizer": "unused-hub-id"}
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": model, **override})


def test_triplet_on_image_text_pairs_needs_a_text_tower():
    with pytest.raises(ConfigError, match="image_text' needs a text tower"):
        from_dict({"model": {"image": {"config": VIT, "projection": "none"}, "embed_dim": 32},
                   "objectives": {"triplet": 1.0}, "ssl": {"triplet": {"pairs": "image_text"}}})
