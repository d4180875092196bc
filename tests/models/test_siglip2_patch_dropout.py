"""Patch dropout on a SigLIP 2 NaFlex tower drops among each image's real patches only, and is off at eval."""
import copy

import pytest
import torch

from mmcl.config import from_dict
from mmcl.models import build_model
from mmcl.models.patch_dropout import naflex_keep, patch_dropout_hooks

VISION = {"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "patch_size": 8, "num_patches": 16}
TEXT = {"model_type": "siglip2_text_model", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8, "projection_size": 32}

GRIDS = torch.tensor([[4, 4], [2, 3], [1, 1]])  # 16, 6 and 1 real patches of 16


def batch(padding: float = 0.0) -> dict:
    torch.manual_seed(1)
    pixels = torch.randn(3, 16, 3 * 64)
    mask = torch.zeros(3, 16, dtype=torch.int32)
    for row, (h, w) in enumerate(GRIDS.tolist()):
        mask[row, : h * w] = 1
        pixels[row, h * w:] = padding
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": GRIDS}


def config(p: float):
    return from_dict({"model": {"image": {"config": VISION, "patch_dropout": p},
                                "text": {"config": TEXT, "tokenizer": "unused-hub-id", "context_length": 8},
                                "embed_dim": 16, "logit_bias_init": -10.0},
                      "objectives": {"siglip": 1.0}, "data": {"naflex": {"patch_size": 8, "max_num_patches": 16}}}).model


def models(p: float):
    torch.manual_seed(0)
    dropped = build_model(config(p))
    torch.manual_seed(0)
    plain = build_model(config(0.0))
    plain.load_state_dict(dropped.state_dict())
    return dropped, plain


def test_naflex_keep_picks_round_1_minus_p_of_each_images_real_patches_in_order():
    mask = batch()["pixel_attention_mask"]
    torch.manual_seed(3)
    index, kept = naflex_keep(mask, 0.5)
    assert kept.sum(dim=1).tolist() == [8, 3, 1] and index.shape == kept.shape == (3, 8)
    for row, real in enumerate([16, 6, 1]):
        chosen = index[row][kept[row].bool()]
        assert bool((chosen < real).all()) and bool((chosen[1:] > chosen[:-1]).all())  # real patches only, in order
        assert bool((kept[row, : len(chosen)] == 1).all())


def test_siglip2_patch_dropout_feeds_the_layers_only_the_kept_real_patches():
    from transformers.masking_utils import create_bidirectional_mask

    dropped, plain = models(0.5)
    dropped.train()
    inputs = batch()
    torch.manual_seed(7)
    ours = dropped.image_tower(**inputs).pooler_output
    assert patch_dropout_hooks(dropped)[0].tokens_out == 8
    torch.manual_seed(7)
    index, kept = naflex_keep(inputs["pixel_attention_mask"], 0.5)
    tower = plain.image_tower.train()
    tokens = tower.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])
    tokens = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=tokens, attention_mask=kept)
    hidden = tower.post_layernorm(tower.encoder(inputs_embeds=tokens, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(ours, tower.head(hidden, kept), atol=1e-6, rtol=0)
    full = plain.image_tower(**inputs).pooler_output
    assert not torch.allclose(ours[0], full[0], atol=1e-3)  # something was dropped
    torch.testing.assert_close(ours[2], full[2], atol=1e-6, rtol=0)  # a one-patch image keeps its patch


def test_siglip2_patch_dropout_never_keeps_padding_and_is_off_in_eval():
    dropped, plain = models(0.5)
    with torch.no_grad():
        dropped.train()
        torch.manual_seed(5)
        zeros = dropped.encode_image(**batch(0.0))
        torch.manual_seed(5)
        garbage = dropped.encode_image(**batch(1e3))  # padding slots hold garbage: nothing changes
        dropped.eval(), plain.eval()
        evaluated = dropped.encode_image(**batch())
        reference = plain.encode_image(**batch())
    torch.testing.assert_close(zeros, garbage, atol=1e-6, rtol=0)
    assert torch.equal(evaluated, reference)
    assert patch_dropout_hooks(dropped)[0].tokens_out == 16


def test_siglip2_patch_dropout_copies_with_the_tower():
    dropped, _ = models(0.25)
    twin = copy.deepcopy(dropped).train()
    torch.manual_seed(2)
    with torch.no_grad():
        out = twin.encode_image(**batch())
    assert out.shape == (3, 16) and patch_dropout_hooks(twin)[0].tokens_out == 12
    assert patch_dropout_hooks(dropped)[0].tokens_out is None


@pytest.mark.parametrize("p", [0.0])
def test_siglip2_without_patch_dropout_has_no_hook(p):
    dropped, _ = models(p)
    assert patch_dropout_hooks(dropped) == []
