"""The documentation site: its generated reference pages (config keys, objectives, every command's
`--help`) are what `python -m mmcl.docs` generates, `mkdocs build --strict` passes offline, and the
README's links point at files that exist."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmcl.config import RunConfig
from mmcl.docs import MARKERS, TARGETS, blocks, blocks_in, config_reference, console_scripts, field_comments, main, write_into
from mmcl.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
STALE = "is stale: run `make docs-reference` (python -m mmcl.docs --write)"


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return blocks()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_reference_page_holds_exactly_its_generated_block(generated, name):
    if name == "cli" and sys.version_info >= (3, 13):  # argparse writes "-o, --out X" from 3.13 on, "-o X, --out X" before
        pytest.skip("the command reference is generated with Python 3.10-3.12's argparse layout")
    page = (REPO / TARGETS[name]).read_text()
    assert blocks_in(page) == [name]
    assert write_into(page, generated) == page, f"{TARGETS[name]} {STALE}"


def test_the_command_reference_has_every_console_script_subcommand_and_script(generated):
    headings = re.findall(r"^### `(.+)`$", generated["cli"], flags=re.M)
    scripts = list(console_scripts())
    assert scripts[:1] == ["mmcl-write-shards"] and "mmcl" in scripts and "mmcl-train" in scripts
    expected = scripts + ["mmcl-write-shards table", "mmcl-write-shards hf", "mmcl-write-shards imagenet", "mmcl export",
                          "mmcl convert", "mmcl convert openclip", "mmcl push", "mmcl wise-ft", "mmcl curate",
                          "mmcl curate score", "mmcl curate reinforce", "mmcl curate select", "mmcl curate write", "mmcl benchmark",
                          "python train.py"]
    expected += [f"python eval/{path.name}" for path in (REPO / "eval").glob("*.py")]
    assert sorted(headings) == sorted(expected)
    # the thin wrappers point at their installed twin; a command's help is the real one
    assert "### `python eval/zeroshot.py`\n\nThe same options as [`mmcl-zeroshot`](#mmcl-zeroshot)" in generated["cli"]
    assert "### `python train.py`\n\nThe same options as [`mmcl-train`](#mmcl-train)" in generated["cli"]
    assert "usage: mmcl push [-h] --model DIR --repo-id ORG/NAME" in generated["cli"]
    assert "usage: mmcl-zeroshot [-h]" in generated["cli"] and "--prompts PROMPTS" in generated["cli"]


def test_console_scripts_are_read_from_pyproject_as_tomllib_reads_them():
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as file:
        assert console_scripts() == tomllib.load(file)["project"]["scripts"]


def test_every_key_of_every_section_is_documented_with_a_comment(generated):
    reference = config_reference()
    keys = [line for line in reference.splitlines()[1:-1] if not line.lstrip().startswith("#")]
    assert [line.strip() for line in keys if "#" not in line] == []  # every key line carries its comment
    assert len(keys) == count_keys(RunConfig)
    for name, objective in OBJECTIVES.items():
        assert f"| `{name}` |" in generated["objectives"]
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


def test_write_fills_the_blocks_a_file_holds_and_refuses_a_file_without_markers(tmp_path, capsys):
    page = tmp_path / "page.md"
    start, end = MARKERS["objectives"]
    page.write_text(f"# Objectives\n\n{start}\nold table\n{end}\n\nafter\n")
    assert main(["--write", str(page)]) == 0
    text = page.read_text()
    assert "old table" not in text and "| `simsiam` |" in text and text.endswith(f"{end}\n\nafter\n")
    assert blocks_in(text) == ["objectives"]
    page.write_text("# nothing generated here\n")
    with pytest.raises(SystemExit, match="holds no generated block's markers"):
        main(["--write", str(page)])
    assert capsys.readouterr().out.startswith("mmcl.docs: wrote ")


def test_mkdocs_builds_the_site_strictly_with_the_generated_pages_and_the_benchmarks(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "WARNING" not in result.stderr
    assert "train_crop_scale" in (site / "reference" / "config" / "index.html").read_text()
    assert "usage: mmcl-write-shards table" in (site / "reference" / "cli" / "index.html").read_text()
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    assert "Benchmark results" in benchmarks and "16,538" in benchmarks  # benchmarks/RESULTS.md, included at build time


def test_every_docs_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_readme_links_point_at_files_that_exist():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "README.md links into the docs"
    assert [link for link in links if not link.startswith("http") and not (REPO / link).exists()] == []
