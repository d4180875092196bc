"""`mmcl curate score --model` with the other model kinds: an mmcl run directory (its model/ is
scored, with the run's image size, normalisation and tokenizer) and `openclip:ARCH --weights FILE
--openclip-config JSON`; each one's scores are its own encodings' cosine similarity."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from curate_helpers import save_tokenizer, write_shards
from mmcl.cli import main

TOWER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TINY_OPENCLIP = {"embed_dim": 10, "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 2, 5)


def scores(out):
    return ds.dataset(str(out / "parts"), format="parquet").to_table().to_pydict()


def test_a_run_directory_is_scored_through_its_model_folder_with_the_runs_inputs(shards, tmp_path):
    from mmcl.config import DataConfig, ModelConfig, RunConfig, TextTowerConfig, TowerConfig
    from mmcl.model_dir import load_mmcl_model_dir, save_model_dir
    from mmcl.models import build_model, build_tokenizer

    save_tokenizer(tmp_path / "tokenizer")
    config = RunConfig(
        model=ModelConfig(image=TowerConfig(config=dict(model_type="vit", image_size=24, patch_size=8, **TOWER)),
                          text=TextTowerConfig(config=dict(model_type="bert", vocab_size=40, max_position_embeddings=16,
                                                           **TOWER), tokenizer=str(tmp_path / "tokenizer"),
                                               context_length=12), embed_dim=10),
        data=DataConfig(image_size=24, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]))
    torch.manual_seed(0)
    save_model_dir(build_model(config.model).eval(), config, build_tokenizer(config.model.text), tmp_path / "run" / "model")
    pattern, good = shards
    assert main(["curate", "score", "--model", str(tmp_path / "run"), "--shards", pattern, "--out", str(tmp_path / "s"),
                 "--workers", "0"]) == 0
    manifest = json.loads((tmp_path / "s" / "mmcl_curate.json").read_text())
    assert manifest["model"] == str(tmp_path / "run" / "model") and manifest["embedding_dim"] == 10
    assert (manifest["transform"]["image_size"], manifest["transform"]["std"]) == (24, [0.2, 0.25, 0.3])
    rows = scores(tmp_path / "s")
    assert rows["key"] == good
    image, text = np.array(rows["image_embedding"], np.float32), np.array(rows["text_embedding"], np.float32)
    np.testing.assert_allclose(rows["score"], (image * text).sum(-1), atol=3e-3)  # float16 embeddings
    model, _, tokenizer = load_mmcl_model_dir(tmp_path / "run" / "model")
    from mmcl.data.tokenize import CaptionTokenizer

    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(*CaptionTokenizer(tokenizer, 12)(rows["caption"])), dim=-1)
    np.testing.assert_array_equal(np.array(rows["text_embedding"], np.float16), expected.numpy().astype(np.float16))


def test_an_openclip_architecture_with_local_weights_is_scored_with_its_own_size_and_tokens(shards, tmp_path):
    import open_clip

    config = tmp_path / "tiny-curate-openclip.json"
    config.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-curate-openclip").eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    pattern, good = shards
    assert main(["curate", "score", "--model", "openclip:tiny-curate-openclip", "--weights", str(tmp_path / "weights.pt"),
                 "--openclip-config", str(config), "--shards", pattern, "--out", str(tmp_path / "s"),
                 "--workers", "0"]) == 0
    manifest = json.loads((tmp_path / "s" / "mmcl_curate.json").read_text())
    assert manifest["model"] == "openclip:tiny-curate-openclip" and manifest["embedding_dim"] == 10
    assert manifest["transform"]["image_size"] == 24
    rows = scores(tmp_path / "s")
    assert rows["key"] == good
    tokens = open_clip.get_tokenizer("tiny-curate-openclip")(rows["caption"])
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    np.testing.assert_array_equal(np.array(rows["text_embedding"], np.float16), text.numpy().astype(np.float16))
