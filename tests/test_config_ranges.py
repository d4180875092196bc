"""Every numeric config key is range-checked: an out-of-range value given on the command line stops
`train.py` with one `mmcl: error:` sentence naming the key, before any process group, no traceback."""
import dataclasses
import subprocess
import sys
import types
import typing

import pytest
import torch.distributed as dist
import yaml

from mmcl.coerce import Bounds
from mmcl.config import RunConfig

from test_config import BASE, REPO  # a valid image-text run: every section reachable

NUMBERS = (int, float)


def _plain(annotation):
    """The non-None members of a (possibly optional / union) annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def numeric_fields(cls=RunConfig, prefix=""):
    """(dotted key, dataclass field, item type, is_list) for every int/float (or list of them) field under `cls`."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        key = f"{prefix}{spec.name}"
        for member in _plain(hints[spec.name]):
            if dataclasses.is_dataclass(member):
                yield from numeric_fields(member, key + ".")
            elif member in NUMBERS:
                yield key, spec, member, False
            elif typing.get_origin(member) is list and typing.get_args(member)[0] in NUMBERS:
                yield key, spec, typing.get_args(member)[0], True


FIELDS = sorted({key: (spec, item, is_list) for key, spec, item, is_list in numeric_fields()}.items())


def out_of_range(spec, item, is_list):
    """A YAML value just outside the field's bounds (or not finite, for a float free of bounds)."""
    bounds: Bounds | None = spec.metadata.get("bounds")
    if bounds is None:
        assert item is float, f"integer field without bounds: {spec.name}"
        bad = ".inf"
    elif bounds.low is not None:
        bad = bounds.low - 1 if item is int else bounds.low - 0.5
    else:
        bad = bounds.high + 1
    if not is_list:
        return str(bad)
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None
    return "[" + ", ".join([str(bad)] * (len(default) if default else 3)) + "]"


def test_the_walk_finds_the_keys_of_every_section():
    keys = {key for key, _ in FIELDS}
    assert len(keys) > 60
    for key in ("train.micro_batch_size", "optim.lr", "train.grad_accum_steps", "data.shuffle_buffer", "optim.betas",
                "model.text.context_length", "ssl.views.flip_p", "ssl.moco.queue_size", "loss.chunk_size",
                "loss.clip_queue.base_momentum", "eval.knn_temperature", "seed", "model.logit_bias_init"):
        assert key in keys


@pytest.mark.parametrize("key, field_info", FIELDS, ids=[key for key, _ in FIELDS])
def test_an_out_of_range_number_is_one_sentence_naming_the_key(key, field_info, tmp_path, capsys):
    from mmcl.engine.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(BASE))
    override = f"{key}={out_of_range(*field_info)}"
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(config), override])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmcl: error: "), err
    assert f"'{key}'" in lines[0] and lines[0].endswith(".") and "Traceback" not in err
    assert f"command-line override '{override}'" in lines[0]
    assert not (dist.is_available() and dist.is_initialized())


def test_a_negative_objective_weight_is_one_sentence(tmp_path, capsys):
    from mmcl.engine.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(BASE))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "objectives.clip=-1"])
    assert capsys.readouterr().err.strip().endswith("'objectives.clip' weight must be >= 0, got -1.0.")


@pytest.mark.slow
def test_the_issue_s_examples_stop_the_real_command_without_a_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(BASE))
    for override, expected in (("optim.lr=-5", "'optim.lr' must be positive, got -5."),
                               ("data.shuffle_buffer=-3", "'data.shuffle_buffer' must be >= 0, got -3.")):
        result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "train.steps=2", override],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(expected), result.stderr
