"""README's configuration reference and objectives table are what `python -m mmcl.docs` generates."""
import dataclasses
import subprocess
import sys
from pathlib import Path

from mmcl.config import RunConfig
from mmcl.docs import blocks, config_reference, field_comments, write_into
from mmcl.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]


def test_readme_holds_the_generated_blocks():
    readme = (REPO / "README.md").read_text()
    assert write_into(readme) == readme, "README.md is stale: run `python -m mmcl.docs --write README.md`"


def test_every_key_of_every_section_is_documented_with_a_comment():
    reference = config_reference()
    keys = [line for line in reference.splitlines()[1:-1] if not line.lstrip().startswith("#")]
    assert [line.strip() for line in keys if "#" not in line] == []  # every key line carries its comment
    assert len(keys) == count_keys(RunConfig)
    for name, objective in OBJECTIVES.items():
        assert f"| `{name}` |" in blocks()["objectives"]
        if objective.settings is not None:  # each objective's section is in the reference, with its docstring
            assert f"  {objective.settings_key.rpartition('.')[2]}:" in reference
            assert field_comments(objective.settings).keys() == {f.name for f in dataclasses.fields(objective.settings)}


def count_keys(cls) -> int:
    """Keys and sections under the dataclass `cls`, as the reference prints them."""
    import typing

    hints = typing.get_type_hints(cls)
    total = 0
    for spec in dataclasses.fields(cls):
        nested = [t for t in typing.get_args(hints[spec.name]) + (hints[spec.name],) if dataclasses.is_dataclass(t)]
        total += 1 + (count_keys(nested[0]) if nested else 0)
    return total


def test_the_command_prints_both_blocks():
    result = subprocess.run([sys.executable, "-m", "mmcl.docs"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "train:" in result.stdout and "| `simsiam` |" in result.stdout
