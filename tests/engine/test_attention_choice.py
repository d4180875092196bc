"""Which attention kernel a tower trains with when its config leaves it to mmcl (mmcl.engine.attention):
eager on the CPU in bf16 at short sequences, SDPA otherwise, an explicit choice always kept; the two
kernels give the same features and the choice is not saved with the model."""
from __future__ import annotations

import json

import torch
from transformers import AutoModel

from mmcl.config import from_dict
from mmcl.engine.attention import EAGER_MAX_TOKENS, choose_attention
from mmcl.models import build_model

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CONTEXT = 12


def model_config(image_size: int = 16, patch_size: int = 4, **image):
    """A CLIP: 16-px images in 4-px patches (17 tokens), 12-token captions (causal + padding mask)."""
    return from_dict({"model": {
        "image": {"config": dict(model_type="clip_vision_model", image_size=image_size, patch_size=patch_size, **COMMON),
                  **image},
        "text": {"config": dict(model_type="clip_text_model", vocab_size=64, max_position_embeddings=CONTEXT,
                                eos_token_id=63, **COMMON),
                 "tokenizer": "unused", "context_length": CONTEXT, "pooling": "eos"},
        "embed_dim": 16}}).model


def kernels(model) -> tuple[str, str]:
    return model.image_tower.config._attn_implementation, model.text_tower.config._attn_implementation


def built(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def test_cpu_bf16_short_sequences_switch_both_towers_to_eager_and_fp32_keeps_sdpa():
    cfg = model_config()
    fp32 = built(cfg)
    assert choose_attention(fp32, cfg, bf16=False) == [] and kernels(fp32) == ("sdpa", "sdpa")
    bf16 = built(cfg)
    assert choose_attention(bf16, cfg, bf16=True) == ["model.image", "model.text"]
    assert kernels(bf16) == ("eager", "eager")


def test_an_explicit_attn_implementation_is_kept():
    cfg = model_config(attn_implementation="sdpa")
    model = built(cfg)
    assert choose_attention(model, cfg, bf16=True) == ["model.text"]
    assert kernels(model) == ("sdpa", "eager")


def test_long_image_sequences_keep_sdpa_unless_patch_dropout_shortens_them():
    cfg = model_config(image_size=64)  # 1 + 16 * 16 = 257 tokens
    assert 257 > EAGER_MAX_TOKENS
    model = built(cfg)
    assert choose_attention(model, cfg, bf16=True) == ["model.text"] and kernels(model)[0] == "sdpa"
    cfg = model_config(image_size=64, patch_dropout=0.5)  # 1 + 128 tokens in training
    model = built(cfg)
    assert choose_attention(model, cfg, bf16=True) == ["model.image", "model.text"]
    cfg = model_config(image_size=64)
    model = built(cfg)  # the run feeds 32-px images (data.image_size): 1 + 8 * 8 tokens
    assert choose_attention(model, cfg, bf16=True, image_size=32) == ["model.image", "model.text"]


def test_eager_and_sdpa_towers_give_the_same_features_with_padding_and_causal_masks():
    cfg = model_config()
    sdpa, eager = built(cfg), built(cfg)
    choose_attention(eager, cfg, bf16=True)
    assert kernels(sdpa) == ("sdpa", "sdpa") and kernels(eager) == ("eager", "eager")
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 7, CONTEXT, 5])
    mask = (torch.arange(CONTEXT)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 62, (4, CONTEXT), generator=generator) * mask
    ids[torch.arange(4), lengths - 1] = 63
    batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator), "input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        for encode in (lambda m: m.encode_image(batch["pixel_values"]),
                       lambda m: m.encode_text(batch["input_ids"], batch["attention_mask"])):
            reference, switched = encode(sdpa), encode(eager)
            assert reference.shape == (4, 16)
            assert torch.allclose(reference, switched, atol=1e-5), (reference - switched).abs().max()


def test_the_choice_is_not_saved_with_the_tower(tmp_path):
    cfg = model_config()
    model = built(cfg)
    choose_attention(model, cfg, bf16=True)
    model.image_tower.save_pretrained(tmp_path)
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_a_tower_without_attention_is_left_alone():
    cfg = from_dict({"model": {"image": {"config": dict(model_type="convnext", image_size=16, num_stages=2,
                                                        hidden_sizes=[8, 16], depths=[1, 1]), "projection": "none"},
                               "embed_dim": 16}, "objectives": {"simclr": 1.0}}).model
    model = built(cfg)
    assert choose_attention(model, cfg, bf16=True) == []


def test_a_momentum_copy_made_after_the_choice_runs_the_same_kernel():
    """set_up chooses before building the task, so BYOL's target tower is eager like its online tower."""
    from mmcl.engine.task import TrainingTask

    run = from_dict({"model": {"image": {"config": dict(model_type="clip_vision_model", image_size=16, patch_size=4,
                                                        **COMMON), "projection": "none"}, "embed_dim": 32},
                     "objectives": {"byol": 1.0}, "ssl": {"byol": {"hidden_dim": 24, "out_dim": 8}}})
    model = built(run.model)
    assert choose_attention(model, run.model, bf16=True) == ["model.image"]
    task = TrainingTask(model, run.objectives, None, run)
    target = task.objectives["byol"].momentum.target["tower"]
    assert target is not model.image_tower
    assert target.config._attn_implementation == model.image_tower.config._attn_implementation == "eager"
