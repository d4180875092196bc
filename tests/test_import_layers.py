"""Imports go one way, down the layers of tests/import_graph.py, and the config stays torch-free."""
import subprocess
import sys
from pathlib import Path

from import_graph import LAYERS, circles, layer_of, read_graph, upward_imports

REPO = Path(__file__).resolve().parents[1]


def test_no_module_of_mmcl_imports_in_a_circle():
    assert circles(read_graph(REPO)) == []


def test_no_module_imports_a_higher_layer_or_a_peer_package():
    bad = [f"{imp.source}:{imp.line} -> {imp.target}" for imp in upward_imports(read_graph(REPO))]
    assert bad == []


def test_every_module_is_in_a_layer_and_the_config_sits_below_the_engine():
    graph = read_graph(REPO)
    layers = {name: layer_of(name) for name in graph.modules}
    order = [name for name, _ in LAYERS]
    assert layers["mmcl.config"] == order.index("config")
    assert layers["mmcl.objectives.settings"] < layers["mmcl.config"] < layers["mmcl.objectives.distill"]
    assert layers["mmcl.model_dir"] < layers["mmcl.objectives.teacher"] < layers["mmcl.engine.trainer"]


def test_the_graph_reader_sees_function_level_imports_and_lazy_package_names(tmp_path):
    package = tmp_path / "mmcl"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def f():\n    from mmcl.engine.trainer import train\n")
    (package / "models" / "__init__.py").write_text('_LAZY = {"build": "mmcl.models.towers"}\n')
    (package / "models" / "towers.py").write_text("from mmcl.config import f\n")
    (package / "engine").mkdir()
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "trainer.py").write_text("from mmcl.models import build\n")
    graph = read_graph(tmp_path)
    assert {(imp.source, imp.target, imp.lazy) for imp in graph.imports} == {
        ("mmcl.config", "mmcl.engine.trainer", True), ("mmcl.models.towers", "mmcl.config", False),
        ("mmcl.engine.trainer", "mmcl.models.towers", False)}
    assert circles(graph) == [["mmcl.config", "mmcl.engine.trainer", "mmcl.models.towers"]]
    assert {(imp.source, imp.target) for imp in upward_imports(graph)} == {
        ("mmcl.config", "mmcl.engine.trainer"), ("mmcl.models.towers", "mmcl.config")}


def test_importing_the_config_imports_neither_torch_nor_transformers():
    code = ("import sys, mmcl.config, mmcl.objectives, mmcl.model_dir\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
