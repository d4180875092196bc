"""SigLIP 2 towers in the dual encoder: NaFlex patch inputs, pooler outputs, the siglip objective trains."""
import json

import pytest
import torch

from mmcl.config import from_dict
from mmcl.data import build_train_loader
from mmcl.engine.sizes import loss_chunk_size
from mmcl.engine.task import TrainingTask
from mmcl.models import build_model

VISION = {"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "patch_size": 8, "num_patches": 16}
TEXT = {"model_type": "siglip2_text_model", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8, "projection_size": 32}


def siglip2_config(shards: str = "unused.tar", tokenizer: str = "unused-hub-id", **model) -> dict:
    return {"model": {"image": {"config": VISION}, "text": {"config": TEXT, "tokenizer": tokenizer, "context_length": 8},
                      "embed_dim": 16, "logit_bias_init": -10.0, "logit_scale_init": 10.0, **model},
            "objectives": {"siglip": 1.0},
            "data": {"train_shards": shards, "naflex": {"patch_size": 8, "max_num_patches": 16}, "num_workers": 0,
                     "shuffle_buffer": 0, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}}


def test_siglip2_towers_pool_their_heads_and_read_only_the_real_patches():
    torch.manual_seed(0)
    model = build_model(from_dict(siglip2_config()).model).eval()
    assert type(model.image_tower).__name__ == "Siglip2VisionModel" and model.image_pooling == "pooler_output"
    assert type(model.text_tower).__name__ == "Siglip2TextModel" and model.text_pooling == "pooler_output"
    pixels = torch.randn(2, 16, 3 * 64)
    mask = torch.ones(2, 16, dtype=torch.int32)
    mask[1, 6:] = 0
    shapes = torch.tensor([[4, 4], [2, 3]])
    with torch.no_grad():
        features = model.encode_image(pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        garbage = pixels.clone()
        garbage[1, 6:] = 100.0  # padding slots: must not change the second image's features
        again = model.encode_image(garbage, pixel_attention_mask=mask, spatial_shapes=shapes)
        alone = model.encode_image(pixels[1:, :6], pixel_attention_mask=mask[1:, :6], spatial_shapes=shapes[1:])
        pooled = model.image_tower(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output
    assert features.shape == (2, 16) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    assert torch.allclose(features, again, atol=1e-6)
    assert torch.allclose(features[1:], alone, atol=1e-5)
    assert torch.allclose(features, torch.nn.functional.normalize(model.image_projection(pooled), dim=-1), atol=1e-6)


def write_mixed_shard(root, count: int = 16):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    sizes = [(40, 16), (16, 40), (32, 32), (64, 24)]
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(count):
            rng = np.random.default_rng(i % 4)  # four distinct image/caption pairs, seen four times each
            w, h = sizes[i % 4]
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, "PNG")
            for ext, data in (("png", out.getvalue()), ("txt", f"a photo of the number {i % 4}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "sizes.json").write_text(json.dumps({"00000.tar": count}))
    return str(root / "00000.tar")


def bert_tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "number"] + [str(d) for d in range(10)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_a_tiny_siglip2_model_trains_on_naflex_batches_with_the_sigmoid_loss(tmp_path):
    cfg = from_dict(siglip2_config(write_mixed_shard(tmp_path)))
    torch.manual_seed(0)
    task = TrainingTask(build_model(cfg.model), cfg.objectives, loss_chunk_size(cfg, 1), cfg)
    assert task.model.logit_bias.item() == -10.0
    loader = build_train_loader(cfg.data, bert_tokenizer(), 8, batch_size=8, seed=0)
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch["pixel_values"].shape == (8, 16, 192) and batch["spatial_shapes"].shape == (8, 2)
            loss = task(batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0]
    assert task.model.logit_bias.grad is not None and task.model.image_tower.head.probe.grad is not None


@pytest.mark.parametrize("change, words", [
    ({"data": {"naflex": None}}, "'model.image' is a SigLIP 2 tower"),
    ({"model": {"image": {"config": {**VISION, "model_type": "vit", "image_size": 16}}}}, "is a 'vit' tower"),
    ({"data": {"naflex": {"patch_size": 16}}}, "'data.naflex.patch_size' is 16"),
    ({"objectives": {"siglip": 1.0, "simclr": 0.5}}, "not simclr"),
])
def test_naflex_config_mismatches_are_one_sentence_before_anything_is_built(change, words):
    from mmcl.config import ConfigError

    raw = siglip2_config()
    for section, values in change.items():
        raw[section] = values if section not in raw or section == "objectives" else {**raw[section], **values}
    with pytest.raises(ConfigError, match=words):
        from_dict(raw)


def test_naflex_config_accepts_in_run_evaluation_shards():
    raw = siglip2_config()
    raw["eval"] = {"zeroshot_shards": "zs.tar", "retrieval_shards": "rt.tar", "knn_train_shards": "a.tar",
                   "knn_test_shards": "b.tar"}
    assert from_dict(raw).eval.zeroshot_shards == "zs.tar"
