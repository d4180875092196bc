"""Config loading: overrides, round trip, and one specific message per class of mistake."""
from pathlib import Path

import pytest
import yaml

from mmcl.config import ConfigError, RunConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "model": {
        "image": {"config": {"model_type": "vit", "hidden_size": 32}},
        "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"},
        "embed_dim": 64,
    },
    "objectives": {"clip": 1.0},
}


def write(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(write(tmp_path, BASE), ["model.embed_dim=128", "model.image.config.num_hidden_layers=3",
                                                 "objectives={clip: 1.0, siglip: 0.5}", "model.logit_bias_init=-10",
                                                 "data.train_crop_scale=[0.5, 1.0]", "optim.lr=2e-3"])
    assert config.optim.lr == 0.002  # PyYAML reads 2e-3 as a string; floats accept it
    assert isinstance(config, RunConfig)
    assert config.model.embed_dim == 128
    assert config.model.image.config == {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 3}
    assert config.objectives == {"clip": 1.0, "siglip": 0.5}
    assert config.model.logit_bias_init == -10.0 and isinstance(config.model.logit_bias_init, float)
    assert config.data.train_crop_scale == [0.5, 1.0]
    assert config.model.text.context_length == 77  # default filled in


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, BASE), ["seed=7", "model.text.lock=true", "model.text.unlocked_layers=1"])
    save_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path, monkeypatch):
    # Shipped configs point at data that `make demo` builds later; stand it in with empty folders.
    (tmp_path / "data" / "demo" / "tokenizer").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)  # distill_demo's teacher: the demo's model
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_config(path), RunConfig)


def test_unknown_key_suggests_the_close_one(tmp_path):
    data = {**BASE, "model": {**BASE["model"], "embed_dims": 3}}
    message = error_of(tmp_path, data)
    assert "run.yaml" in message and "unknown key 'model.embed_dims'" in message and "did you mean 'model.embed_dim'" in message


def test_unknown_key_from_command_line_names_the_override(tmp_path):
    message = error_of(tmp_path, BASE, ("model.imag.config.hidden_size=3",))
    assert message.startswith("command-line override 'model.imag.config.hidden_size=3'")
    assert "did you mean 'model.image'" in message


def test_wrong_type_names_key_and_value(tmp_path):
    message = error_of(tmp_path, BASE, ("model.embed_dim=abc",))
    assert "'model.embed_dim' must be an integer, got str 'abc'" in message
    message = error_of(tmp_path, {**BASE, "seed": 1.5})
    assert "'seed' must be an integer, got float 1.5" in message
    message = error_of(tmp_path, BASE, ("model.image.lock=yes please",))
    assert "'model.image.lock' must be true or false" in message


def test_bad_choice_lists_choices(tmp_path):
    message = error_of(tmp_path, BASE, ("model.image.pooling=mea",))
    assert "must be one of auto, cls, mean" in message and "did you mean 'mean'" in message


def test_missing_required_key(tmp_path):
    message = error_of(tmp_path, {"objectives": {"clip": 1.0}})
    assert message == f"{tmp_path / 'run.yaml'}: missing required key 'model'."
    message = error_of(tmp_path, {"model": {"text": BASE["model"]["text"]}})
    assert "missing required key 'model.image'" in message


def test_missing_path_is_reported(tmp_path):
    message = error_of(tmp_path, BASE, ("model.text.tokenizer=./no/such/tokenizer",))
    assert "'model.text.tokenizer' points to './no/such/tokenizer', which does not exist" in message
    message = error_of(tmp_path, BASE, ("model.image.name_or_path=/nowhere/vit", "model.image.config=null"))
    assert "'model.image.name_or_path' points to '/nowhere/vit'" in message


def test_hub_ids_are_not_mistaken_for_paths(tmp_path):
    config = load_config(write(tmp_path, BASE), ["model.text.tokenizer=google-bert/bert-base-uncased"])
    assert config.model.text.tokenizer == "google-bert/bert-base-uncased"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_objective_and_cross_key_rules(tmp_path):
    assert "unknown objective 'objectives.clp' — did you mean 'clip'" in error_of(tmp_path, {**BASE, "objectives": {"clp": 1.0}})
    assert "'siglip' needs 'model.logit_bias_init'" in error_of(tmp_path, {**BASE, "objectives": {"siglip": 1.0}})
    both = {**BASE, "model": {**BASE["model"], "image": {"config": {"model_type": "vit"}, "name_or_path": "google/vit"}}}
    assert "needs exactly one of 'name_or_path'" in error_of(tmp_path, both)
    assert "needs a 'model_type'" in error_of(tmp_path, BASE, ("model.image.config={hidden_size: 3}",))
    assert "only applies with 'model.text.lock: true'" in error_of(tmp_path, BASE, ("model.text.unlocked_layers=2",))
    assert "'data.samples_per_epoch' is required" in error_of(tmp_path, BASE, ("data.train_shards=x.tar", "data.resampled=true"))


def test_malformed_yaml_and_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(write(tmp_path, BASE), ["model.embed_dim"])


def test_yaml_errors_name_the_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  image: {config: 1}\n  text:\n\tbad: 1\n")
    with pytest.raises(ConfigError) as failed:
        load_config(path)
    assert str(failed.value) == (f"{path}: not valid YAML at line 4, column 1 (found character '\\t' that cannot start any token).")
    path.write_text("model:\n  image: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line 3, column 1 .*flow sequence at line 2, column 10"):
        load_config(path)


def test_config_paths_that_exist_but_are_no_yaml_file_say_what_they_are(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file /dev/null is empty; a run config needs at least a `model:` section"):
        load_config("/dev/null")
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path} is a folder; give the run's YAML file\.$"):
        load_config(tmp_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\xff\xfe" * 10)
    with pytest.raises(ConfigError, match=r"weights.bin is not a text file"):
        load_config(binary)
