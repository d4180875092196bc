"""data.captions_from_labels (FLYP): the config rules it adds, each one sentence."""
import pytest
import yaml

from mmcl.config import ConfigError, load_config

BASE = {
    "model": {
        "image": {"config": {"model_type": "vit", "hidden_size": 32}},
        "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"},
        "embed_dim": 64,
    },
    "objectives": {"clip": 1.0},
    "data": {"captions_from_labels": True},
    "eval": {"classnames": ["cat", "dog"], "templates": ["a photo of a {}."]},
}


def load(tmp_path, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return load_config(path, list(overrides))


def test_captions_from_labels_loads_with_classnames_and_the_clip_objective(tmp_path):
    config = load(tmp_path)
    assert config.data.captions_from_labels is True and config.eval.classnames == ["cat", "dog"]


def test_captions_from_labels_needs_the_class_names(tmp_path):
    with pytest.raises(ConfigError, match=r"set 'eval.classnames' \(label i is the i-th name\)"):
        load(tmp_path, ["eval.classnames=null"])


@pytest.mark.parametrize("objectives", ["{siglip: 1.0}", "{clip: 1.0, siglip: 1.0}"])
def test_captions_from_labels_refuses_objectives_that_cannot_mask_same_class_pairs(tmp_path, objectives):
    with pytest.raises(ConfigError, match=r"trains with the clip objective.*use objectives: \{clip: 1.0\} instead of siglip"):
        load(tmp_path, [f"objectives={objectives}", "model.logit_bias_init=-10"])
