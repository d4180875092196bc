"""LoRA adapters (peft) on tiny towers: what trains, what the optimizer holds, merging and the peft adapter folder."""
from __future__ import annotations

import json

import pytest
import torch

from mmcl.models import build_model
from mmcl.models.lora import add_lora, default_target_modules, has_lora, merge_lora
from mmcl.models.settings import LoraConfig
from mmcl.models.towers import build_tower

from .tiny import IMAGE_CONFIGS, TEXT_CONFIGS, image_batch, model_config, text_batch


@pytest.mark.parametrize("kind, family, expected", [
    ("image", "vit", ["q_proj", "v_proj"]),
    ("image", "clip_vision_model", ["q_proj", "v_proj"]),
    ("image", "convnext", ["pwconv1", "pwconv2"]),  # no attention: every Linear of the stages
    ("text", "bert", ["query", "value"]),
    ("text", "clip_text_model", ["q_proj", "v_proj"]),
    ("text", "t5", ["q", "v"]),
])
def test_default_targets_are_the_attention_query_and_value_of_each_family(kind, family, expected):
    from mmcl.models.settings import TowerConfig

    config = (IMAGE_CONFIGS if kind == "image" else TEXT_CONFIGS)[family]
    tower = build_tower(TowerConfig(config=dict(config)), kind)
    assert default_target_modules(tower) == expected


def _lora_model(**overrides):
    torch.manual_seed(0)
    return build_model(model_config(image_lora=LoraConfig(rank=4, alpha=8.0), text_lora=LoraConfig(rank=2), **overrides))


def test_only_adapters_projections_and_logit_scale_train_and_get_optimizer_state():
    from mmcl.engine.optim import build_optimizer
    from mmcl.engine.settings import OptimConfig

    model = _lora_model()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith(("image_projection", "text_projection", "logit_scale"))
                             for name in trainable)
    adapters = [n for n in trainable if "lora_" in n]
    # rank 4 on the image tower's q/v (2 layers x 2 modules x (A: 4x32 + B: 32x4)), rank 2 on BERT's query/value
    assert sum(model.get_parameter(n).numel() for n in adapters) == 2 * 2 * (4 * 32 * 2) + 2 * 2 * (2 * 32 * 2)

    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    pixels, (ids, mask) = image_batch(), text_batch()
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
    optimizer.step()
    state_elements = sum(t.numel() for state in optimizer.state.values() for k, t in state.items() if k != "step")
    expected = 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # exp_avg + exp_avg_sq
    assert state_elements == expected
    total = sum(p.numel() for p in model.parameters())
    assert state_elements < 0.25 * 2 * total


def test_fresh_adapters_leave_the_seeded_init_and_the_embeddings_unchanged_and_merging_keeps_trained_ones():
    torch.manual_seed(0)
    plain = build_model(model_config()).eval()
    model = _lora_model().eval()
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() == plain.state_dict().keys()
    assert all(torch.equal(base[k], v) for k, v in plain.state_dict().items())  # same seed, same towers and heads
    pixels, (ids, mask) = image_batch(), text_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), plain.encode_image(pixels), atol=0, rtol=0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # trained adapters: B is no longer zero
                parameter.normal_(0, 0.5)
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        assert (image - plain.encode_image(pixels)).abs().max() > 1e-2
        merge_lora(model.image_tower), merge_lora(model.text_tower)
        assert not has_lora(model)
        queries = [m for n, m in model.image_tower.named_modules() if n.endswith("q_proj")]
        assert len(queries) == 2 and all(type(m) is torch.nn.Linear for m in queries)
        torch.testing.assert_close(model.encode_image(pixels), image, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, mask), text, atol=1e-6, rtol=0)


def test_lora_with_lock_and_unknown_targets_are_refused_in_one_sentence(tmp_path):
    from mmcl.config import ConfigError, from_dict

    raw = {"model": {"image": {"config": dict(IMAGE_CONFIGS["vit"]), "lock": True, "lora": {"rank": 4}}},
           "objectives": {"simclr": 1.0}, "data": {"train_shards": "x.tar"}}
    with pytest.raises(ConfigError, match=r"'model.image.lora' trains adapters on a tower that 'lock: true' freezes"):
        from_dict(raw)
    tower = build_tower(model_config().image, "image")
    with pytest.raises(ValueError, match=r"^'model.image.lora.target_modules' = \['nope'\] matches no Linear layer of "
                                         r"ViTModel; name modules it has \(e.g. \['q_proj', 'v_proj'\]\).$"):
        add_lora(tower, LoraConfig(target_modules=["nope"]))


def test_export_merges_adapters_exactly_and_keeps_them_as_a_peft_folder_on_request(tmp_path):
    """A pretrained base tower (tiny, saved locally) with trained adapters: the merged export reproduces
    mmcl in plain transformers, and peft's PeftModel on the base tower reproduces the adapted tower."""
    import sys
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from export_helpers import IMAGE, build, run_config

    from mmcl.export import export_model
    from mmcl.models.settings import TowerConfig

    base = tmp_path / "base_vit"
    torch.manual_seed(1)
    build_tower(TowerConfig(config=dict(IMAGE["vit"])), "image").save_pretrained(base)
    config = run_config(None, text=None)
    config.model.image = TowerConfig(name_or_path=str(base), pooling="cls", lora=LoraConfig(rank=4, alpha=8.0))
    model, _ = build(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tower_out = model.image_tower(pixel_values=pixels).last_hidden_state
        pooled = model.pooled_image_features(pixels)
    adapted = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    out = export_model(model, config, None, tmp_path / "export", adapters=True)
    info = json.loads((out / "mmcl_export.json").read_text())
    assert info["image"]["exact"] and "adapters" not in info["files"]
    hf = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).pooler_output.flatten(1), pooled, atol=1e-5, rtol=0)

    adapter = out / "adapters" / "image"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] is None  # no local path
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(adapter)).eval()
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(adapted)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pixel_values=pixels).last_hidden_state, tower_out, atol=1e-5, rtol=0)
