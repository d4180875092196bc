"""The training task with self-supervised objectives: what each objective reads, the weighted sum,
BYOL's target (never trained, EMA-updated, saved and restored), and parameter groups."""
import pytest
import torch

from mmcl.config import RunConfig, from_dict
from mmcl.engine.optim import parameter_groups
from mmcl.engine.sizes import loss_chunk_size
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model, cosine_momentum
from mmcl.objectives import needs_of, simclr_temperature
from mmcl.objectives.byol import BYOLObjective
from mmcl.objectives.simclr import SimCLRObjective

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
BERT = {"model_type": "bert", "vocab_size": 50, "max_position_embeddings": 8, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64}
SSL = {"simclr": {"hidden_dim": 24, "out_dim": 8}, "byol": {"hidden_dim": 24, "out_dim": 8, "base_momentum": 0.9}}


def config(objectives: dict, text: bool = False) -> RunConfig:
    model = {"image": {"config": VIT, "pooling": "cls", "projection": "linear" if text else "none"}, "embed_dim": 32}
    if text:
        model["text"] = {"config": BERT, "tokenizer": "unused-hub-id", "context_length": 8}
    return from_dict({"model": model, "objectives": objectives, "ssl": SSL})


def task_for(objectives: dict, text: bool = False, seed: int = 0) -> TrainingTask:
    cfg = config(objectives, text)
    torch.manual_seed(seed)
    return TrainingTask(build_model(cfg.model), cfg.objectives, loss_chunk_size(cfg, 1), cfg)


def batch(size: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(size, 3, 16, 16, generator=g),
            "views": [torch.randn(size, 3, 16, 16, generator=g), torch.randn(size, 3, 16, 16, generator=g)],
            "input_ids": torch.randint(1, 50, (size, 8), generator=g), "attention_mask": torch.ones(size, 8, dtype=torch.long)}


def test_objectives_declare_what_they_read():
    assert needs_of(["clip"]) == {"pixel_values", "text"}
    assert needs_of(["byol"]) == needs_of(["simclr"]) == {"views"}
    assert needs_of(["clip", "simclr"]) == {"pixel_values", "text", "views"}
    joint = task_for({"clip": 1.0, "simclr": 0.5}, text=True)
    assert joint.needs == {"pixel_values", "text", "views"} and not joint.cacheable
    assert task_for({"clip": 1.0}, text=True).cacheable


def test_simclr_temperature_defaults_to_slip_beside_clip_and_higher_alone():
    assert simclr_temperature(config({"clip": 1.0, "simclr": 1.0}, text=True)) == 0.1
    assert simclr_temperature(config({"simclr": 1.0})) == 0.2
    assert task_for({"simclr": 1.0}).objectives["simclr"].loss.temperature == 0.2


def test_joint_loss_is_the_weighted_sum_and_every_objective_is_logged():
    task = task_for({"clip": 1.0, "simclr": 0.5}, text=True)
    out = task(batch())
    assert set(out) >= {"loss", "clip", "clip/i2t_acc", "clip/t2i_acc", "simclr", "simclr/view_acc", "logit_scale"}
    assert out["loss"].item() == pytest.approx(out["clip"].item() + 0.5 * out["simclr"].item(), rel=1e-6)
    out["loss"].backward()
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad and ".pooler." not in n]  # cls pooling
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert task.objectives["simclr"].head.layers[0].weight.grad.abs().sum() > 0


def test_image_only_run_gives_the_unused_logit_scale_a_zero_gradient():
    task = task_for({"simclr": 1.0})
    out = task({"views": batch()["views"]})
    assert "logit_scale" not in out and set(out) == {"loss", "simclr", "simclr/view_acc"}
    out["loss"].backward()
    assert task.model.logit_scale.grad is not None and task.model.logit_scale.grad.item() == 0.0
    assert task.model.image_tower.embeddings.cls_token.grad.abs().sum() > 0


def test_byol_target_never_receives_gradients_and_is_outside_the_optimizer():
    task = task_for({"byol": 1.0})
    byol: BYOLObjective = task.objectives["byol"]
    target_ids = {id(p) for p in byol.momentum.target.parameters()}
    assert target_ids and not target_ids & {id(p) for p in task.parameters()}  # not registered: DeepSpeed never sees it
    assert not target_ids & {id(p) for g in parameter_groups(task, config({"byol": 1.0}).optim, "model.") for p in g["params"]}
    assert "target" not in "".join(task.state_dict())
    out = task({"views": batch()["views"]})
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in byol.momentum.target.parameters())
    assert byol.predictor.layers[0].weight.grad.abs().sum() > 0 and byol.projector.layers[0].weight.grad.abs().sum() > 0
    assert set(out) == {"loss", "byol", "byol/cos"}


def test_byol_target_starts_equal_and_follows_the_ema_schedule():
    task = task_for({"byol": 1.0})
    byol: BYOLObjective = task.objectives["byol"]
    pairs = list(byol.parameter_pairs())
    assert all(torch.equal(t, o) for t, o in pairs)
    before = [t.clone() for t, _ in pairs]
    with torch.no_grad():  # stand-in for an optimizer step
        for _, online in pairs:
            online.add_(torch.randn_like(online))
    logged = task.after_optimizer_step(step=1, total_steps=10)
    assert logged == {"byol/momentum": pytest.approx(0.9)}  # step 1 uses the base momentum
    for (target, online), old in zip(pairs, before):
        assert torch.allclose(target, 0.9 * old + 0.1 * online, atol=1e-6)
    logged = task.after_optimizer_step(step=6, total_steps=10)
    assert logged["byol/momentum"] == pytest.approx(cosine_momentum(5, 10, 0.9)) == pytest.approx(0.95)


def test_byol_target_runs_in_the_online_networks_mode():
    task = task_for({"byol": 1.0})
    byol: BYOLObjective = task.objectives["byol"]
    task.eval()
    byol.encode_target(batch()["views"])
    assert not any(m.training for key in ("tower", "projector") for m in byol.momentum.target[key].modules())
    task.train()
    byol.encode_target(batch()["views"])
    assert all(m.training for m in byol.momentum.target["projector"].modules())


def test_extra_state_restores_the_target_exactly():
    task = task_for({"byol": 1.0})
    with torch.no_grad():
        for _, online in task.objectives["byol"].parameter_pairs():
            online.mul_(1.5)
    task.after_optimizer_step(1, 10)
    state = task.extra_state()
    assert state and all(key.startswith("byol.momentum.") for key in state)
    fresh = task_for({"byol": 1.0}, seed=1)
    fresh.load_extra_state(state)
    for (a, _), (b, _) in zip(task.objectives["byol"].parameter_pairs(), fresh.objectives["byol"].parameter_pairs()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_extra_state({})
    assert task_for({"simclr": 1.0}).extra_state() == {}


def test_ssl_heads_are_trained_with_the_heads_group():
    task = task_for({"clip": 1.0, "simclr": 1.0}, text=True)
    groups = {g["name"]: g for g in parameter_groups(task, config({"clip": 1.0}, text=True).optim, "model.")}
    head = task.objectives["simclr"].head
    assert any(p is head.layers[0].weight for p in groups["heads/decay"]["params"])
    assert any(p is head.layers[1].weight for p in groups["heads/no_decay"]["params"])  # BatchNorm: no decay
    assert any(p is task.model.image_tower.embeddings.cls_token for p in groups["image_tower/no_decay"]["params"])
    assert isinstance(task.objectives["simclr"], SimCLRObjective)


def chunk_config(objectives: dict, micro: int = 256, accum: int = 1, accumulation: str = "feature_cache",
                 chunk_size="auto") -> RunConfig:
    model = {"image": {"config": VIT, "pooling": "cls"}, "embed_dim": 32, "logit_bias_init": -10.0,
             "text": {"config": BERT, "tokenizer": "unused-hub-id", "context_length": 8}}
    return from_dict({"model": model, "objectives": objectives, "ssl": SSL, "loss": {"chunk_size": chunk_size},
                      "train": {"micro_batch_size": micro, "grad_accum_steps": accum, "accumulation": accumulation}})


def test_auto_chunk_size_chunks_once_the_logits_of_one_loss_evaluation_pass_4096_squared():
    from mmcl.losses.chunked import DEFAULT_CHUNK

    clip = {"clip": 1.0}
    assert loss_chunk_size(chunk_config(clip, micro=4096), 1) is None  # 4096 x 4096: dense
    assert loss_chunk_size(chunk_config(clip, micro=4097), 1) == DEFAULT_CHUNK
    assert loss_chunk_size(chunk_config(clip, micro=256), 256) is None  # 256 x 65536 = 4096^2
    assert loss_chunk_size(chunk_config(clip, micro=256), 512) == DEFAULT_CHUNK
    # feature caching evaluates the loss once over all micro-batches: 8 x 256 rows x 2 ranks' columns
    assert loss_chunk_size(chunk_config(clip, micro=256, accum=8), 2) is None
    assert loss_chunk_size(chunk_config(clip, micro=256, accum=8), 8) == DEFAULT_CHUNK
    assert loss_chunk_size(chunk_config(clip, micro=256, accum=8, accumulation="plain"), 8) is None
    # SimCLR's heads are not cacheable, so the step accumulates plainly: one micro-batch per loss
    assert loss_chunk_size(chunk_config({"clip": 1.0, "simclr": 0.5}, micro=256, accum=8), 8) is None
    assert loss_chunk_size(chunk_config({"clip_queue": 1.0}, micro=8192), 1) is None  # always dense


def test_explicit_chunk_size_wins_and_auto_gives_the_objectives_a_chunked_loss():
    assert loss_chunk_size(chunk_config({"clip": 1.0}, micro=8, chunk_size=512), 1) == 512
    assert loss_chunk_size(chunk_config({"clip": 1.0}, micro=8192, chunk_size=None), 1) is None
    cfg = chunk_config({"siglip": 1.0}, micro=8192)
    task = TrainingTask(build_model(cfg.model), cfg.objectives, loss_chunk_size(cfg, 1), cfg)
    assert task.objectives["siglip"].loss.chunk_size == 2048
