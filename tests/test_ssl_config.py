"""Config rules of the self-supervised objectives: image-only runs, ssl.* values, kNN evaluation."""
from pathlib import Path

import pytest
import yaml

from mmcl.config import ConfigError, load_config

VIT = {"model_type": "vit", "hidden_size": 32}
IMAGE_ONLY = {"model": {"image": {"config": VIT, "projection": "none"}, "embed_dim": 32}, "objectives": {"byol": 1.0}}
JOINT = {
    "model": {"image": {"config": VIT}, "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"},
              "embed_dim": 64},
    "objectives": {"clip": 1.0, "simclr": 0.5},
}


def load(tmp_path: Path, data: dict, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


def error_of(tmp_path: Path, data: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data, *overrides)
    return str(caught.value)


def test_image_only_and_joint_runs_load_with_ssl_defaults(tmp_path):
    config = load(tmp_path, IMAGE_ONLY, "ssl.byol.base_momentum=0.996", "ssl.views.blur_p=[1.0, 0.1]")
    assert config.model.text is None and config.objectives == {"byol": 1.0}
    assert config.ssl.byol.base_momentum == 0.996 and config.ssl.byol.final_momentum == 1.0
    assert config.ssl.views.crop_scale == [0.08, 1.0] and config.ssl.views.color_jitter == [0.4, 0.4, 0.4, 0.1]
    assert config.ssl.views.color_jitter_p == 0.8 and config.ssl.views.grayscale_p == 0.2
    assert config.ssl.views.blur_sigma == [0.1, 2.0] and config.ssl.views.solarize_p is None
    joint = load(tmp_path, JOINT, "ssl.simclr.temperature=0.1")
    assert joint.objectives == {"clip": 1.0, "simclr": 0.5} and joint.ssl.simclr.temperature == 0.1


def test_image_only_runs_have_no_text_tower_and_no_untrained_projection(tmp_path):
    with_text = {**IMAGE_ONLY, "model": {**IMAGE_ONLY["model"], "text": JOINT["model"]["text"]}}
    assert "'model.text' is set but no objective uses a text tower (byol)" in error_of(tmp_path, with_text)
    message = error_of(tmp_path, IMAGE_ONLY, "model.image.projection=linear")
    assert "'model.image.projection' is linear but nothing trains it without clip/siglip" in message
    assert "set model.embed_dim to 32" in error_of(tmp_path, IMAGE_ONLY, "model.embed_dim=64")
    assert "'eval.zeroshot_shards' needs a text tower" in error_of(tmp_path, IMAGE_ONLY, "eval.zeroshot_shards=x.tar")
    assert "objective 'clip' needs a text tower" in error_of(tmp_path, IMAGE_ONLY, "objectives={clip: 1.0, byol: 1.0}")


def test_bad_ssl_values_are_named(tmp_path):
    assert "'ssl.views.blur_p' must have 2 values" in error_of(tmp_path, IMAGE_ONLY, "ssl.views.blur_p=[0.5]")
    assert "'ssl.views.solarize_p' must be probabilities" in error_of(tmp_path, IMAGE_ONLY, "ssl.views.solarize_p=[0, 2]")
    assert "'ssl.views.crop_scale' must be [min, max]" in error_of(tmp_path, IMAGE_ONLY, "ssl.views.crop_scale=[0.5, 0.1]")
    assert "'ssl.views.color_jitter' must be" in error_of(tmp_path, IMAGE_ONLY, "ssl.views.color_jitter=[0.4, 0.4]")
    assert "'ssl.simclr.temperature' must be positive" in error_of(tmp_path, JOINT, "ssl.simclr.temperature=0")
    assert "0 <= base <= final <= 1" in error_of(tmp_path, IMAGE_ONLY, "ssl.byol.base_momentum=1.5")
    assert "unknown key 'ssl.byol.momentum'" in error_of(tmp_path, IMAGE_ONLY, "ssl.byol.momentum=0.99")
    assert "unknown objective 'objectives.simclar' — did you mean 'simclr'" in error_of(tmp_path, IMAGE_ONLY, "objectives={simclar: 1.0}")
    moco = ("objectives={moco: 1.0}", "ssl.sync_batchnorm=true")
    assert "set ssl.moco.shuffle_bn: false" in error_of(tmp_path, IMAGE_ONLY, *moco)
    assert load(tmp_path, IMAGE_ONLY, *moco, "ssl.moco.shuffle_bn=false").ssl.sync_batchnorm


def test_knn_evaluation_keys_go_together(tmp_path):
    config = load(tmp_path, IMAGE_ONLY, "eval.knn_train_shards=a.tar", "eval.knn_test_shards=b.tar", "eval.linear_probe=true")
    assert (config.eval.knn_k, config.eval.knn_temperature, config.eval.linear_probe) == (20, 0.07, True)
    assert "go together" in error_of(tmp_path, IMAGE_ONLY, "eval.knn_train_shards=a.tar")
    assert "'eval.linear_probe' needs" in error_of(tmp_path, IMAGE_ONLY, "eval.linear_probe=true")
