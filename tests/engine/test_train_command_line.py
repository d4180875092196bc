"""train.py's command line: overrides anywhere among the flags, launcher-inserted ranks, clear errors."""
from __future__ import annotations

import pytest
import yaml

from mmcl.engine.cli import main, parse_args


@pytest.mark.parametrize("argv", [
    ["--config", "c.yaml", "train.steps=24", "--deepspeed_config", "ds.json", "train.resume=latest"],
    ["train.steps=24", "--config", "c.yaml", "train.resume=latest", "--deepspeed_config", "ds.json"],
    ["train.steps=24", "train.resume=latest", "--deepspeed_config=ds.json", "--config=c.yaml"],
    ["--deepspeed-config", "ds.json", "train.steps=24", "--config", "c.yaml", "train.resume=latest"],
])
def test_overrides_on_both_sides_of_flags_keep_their_order(argv):
    args = parse_args(argv)
    assert args.config == "c.yaml" and args.deepspeed_config == "ds.json"
    assert args.overrides == ["train.steps=24", "train.resume=latest"]


@pytest.mark.parametrize("rank_flag", ["--local_rank=1", "--local-rank=1"])
@pytest.mark.parametrize("position", [0, 2, 3, 6])
def test_launcher_local_rank_flag_in_any_position(rank_flag, position):
    # deepspeed's launcher puts `--local_rank=N` right after the script (position 0), torch's
    # `--local-rank=N`; a wrapper script may put it anywhere.
    argv = ["--config", "c.yaml", "train.steps=24", "--deepspeed_config", "ds.json", "optim.lr=1e-3"]
    argv.insert(position, rank_flag)
    args = parse_args(argv)
    assert args.local_rank == 1 and args.config == "c.yaml" and args.deepspeed_config == "ds.json"
    assert args.overrides == ["train.steps=24", "optim.lr=1e-3"]


def test_override_values_may_hold_spaces_dashes_and_equals():
    args = parse_args(["--config", "c.yaml", "data.train_shards=pipe:curl -s http://h/{0..3}.tar", "optim.lr=-5",
                       "eval.templates=a=b"])
    assert args.overrides == ["data.train_shards=pipe:curl -s http://h/{0..3}.tar", "optim.lr=-5", "eval.templates=a=b"]


@pytest.mark.parametrize("flag", ["--stepz", "--train.steps=24", "-x"])
def test_unknown_flag_is_one_sentence_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--config", "c.yaml", "train.steps=24", flag, "train.resume=latest"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"train.py: error: unrecognized flag '{flag}': train.py takes --config, --deepspeed_config and "
                       "key.sub=value overrides (written without dashes, anywhere on the line).")


def test_stray_word_that_is_not_key_value_is_one_sentence_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out")}))
    with pytest.raises(SystemExit) as caught:
        main(["--config", str(config), "train.steps=24", "latest", "--deepspeed_config", "ds.json"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err == "mmcl: error: command-line override 'latest' must look like key.sub=value.\n"


def test_overrides_from_both_sides_reach_the_config(tmp_path):
    from mmcl.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image": {"config": {"model_type": "vit", "hidden_size": 32}},
                  "text": {"config": {"model_type": "bert"}, "tokenizer": "bert-base-uncased"}, "embed_dim": 64},
        "output_dir": str(tmp_path / "out"),
    }))
    args = parse_args(["train.steps=24", "--config", str(config), "--local_rank=0", "train.resume=latest",
                       "--deepspeed_config", "ds.json", "train.steps=30"])
    cfg = load_config(args.config, args.overrides)
    assert cfg.train.steps == 30 and cfg.train.resume == "latest"  # the last word wins, as before
