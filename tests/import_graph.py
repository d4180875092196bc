"""mmcl's import graph, read from the source (AST, nothing is imported): circles, imports that
go up the layer order, and the largest module and function.

    python tests/import_graph.py [ROOT]      # prints the report for ROOT/mmcl (default: this checkout)

`tests/test_import_layers.py` pins the result: no circle, no upward import. Both module-level
imports and imports inside functions count (a lazy import still ties the modules together);
imports under `if TYPE_CHECKING:` do not (they never run).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The layer order, bottom first. A module may import modules of its own layer and of lower
# layers, never of a higher one (`upward_imports`), and no import may close a circle (`circles`).
# An entry "pkg.*" is the package and every module in it; a plain entry is that module alone; the
# most specific entry decides a module's layer. So a package's torch-free `settings` module,
# which `mmcl.config` assembles, sits below the config while the rest of its package sits above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mmcl", "mmcl.coerce", "mmcl.distributed", "mmcl.lazy", "mmcl.redact", "mmcl.safe_unpickle", "mmcl.manifest")),
    # torch-free: the config's sections, the objectives' declarations and their registry
    ("settings", ("mmcl.data.settings", "mmcl.models.settings", "mmcl.engine.settings", "mmcl.evaluation.settings",
                  "mmcl.evaluation.prompts", "mmcl.export.settings", "mmcl.export.errors", "mmcl.objectives",
                  "mmcl.objectives.settings")),
    ("components", ("mmcl.data.*", "mmcl.models.*", "mmcl.losses.*")),
    ("config", ("mmcl.config",)),
    # what a model directory, an export and a teacher folder hold, and reading an export back
    ("model directory", ("mmcl.model_dir", "mmcl.export.hf_loader", "mmcl.pretrained")),
    ("objectives", ("mmcl.objectives.*",)),
    ("evaluation", ("mmcl.evaluation.*", "mmcl.curate.*")),
    ("export", ("mmcl.export.*",)),
    # the trainer evaluates during training and exports/pushes at its end
    ("engine", ("mmcl.engine.*",)),
    ("cli", ("mmcl.cli", "mmcl.docs", "mmcl.engine.cli", "mmcl.evaluation.cli")),
]
# Packages of one layer that must not import each other (the data pipeline knows no model, the
# losses know no data).
PEERS: tuple[str, ...] = ("mmcl.data", "mmcl.models", "mmcl.losses")


@dataclass
class Import:
    source: str  # the importing module
    target: str  # the imported mmcl module (the most specific module the statement names)
    line: int
    lazy: bool  # inside a function
    name: str | None = None  # the name a `from X import name` statement imports


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if imp.target != imp.source:
                out[imp.source].add(imp.target)
        return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is an mmcl module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module's relative imports start from."""
    return module if modules[module].name == "__init__.py" else module.rpartition(".")[0]


def read_graph(root: Path, type_checking: bool = False) -> Graph:
    """Every `mmcl` module under `root` and the mmcl imports each one makes (with `type_checking`,
    also those under `if TYPE_CHECKING:`, which only type checkers follow)."""
    files = sorted((root / "mmcl").rglob("*.py"))
    graph = Graph({module_name(path, root): path for path in files})
    lazy_tables = {name: _lazy_table(path) for name, path in graph.modules.items() if path.name == "__init__.py"}
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(), str(path))
        _collect(tree, name, graph, lazy=False, type_checking=type_checking)
    # `from pkg import name` where pkg imports `name` on first use (a `_LAZY` table): the module it comes from.
    for imp in graph.imports:
        if imp.name and imp.name in lazy_tables.get(imp.target, {}):
            imp.target = lazy_tables[imp.target][imp.name]
    unique = {(imp.source, imp.target, imp.line): imp for imp in graph.imports}
    graph.imports = list(unique.values())
    return graph


def _lazy_table(path: Path) -> dict[str, str]:
    """A package's `_LAZY = {"name": "module", ...}` (names its `__getattr__` imports on first use)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _collect(node: ast.AST, module: str, graph: Graph, lazy: bool, type_checking: bool = False) -> None:
    for child in ast.iter_child_nodes(node):
        if _type_checking_block(child) and not type_checking:
            for other in child.orelse:
                _collect(other, module, graph, lazy)
            continue
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.Import):
            for alias in child.names:
                target = _resolve(alias.name, graph.modules)
                if target:
                    graph.imports.append(Import(module, target, child.lineno, lazy))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                package = _package_of(module, graph.modules).split(".")
                package = package[: len(package) - (child.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "mmcl":
                continue
            for alias in child.names:
                target = _resolve(f"{base}.{alias.name}", graph.modules) or _resolve(base, graph.modules)
                if target:
                    graph.imports.append(Import(module, target, child.lineno, lazy, alias.name))
        _collect(child, module, graph, inner, type_checking)


def layer_of(module: str) -> int:
    """The index in LAYERS of `module` (ValueError for a module no entry covers)."""
    best, index = (-1, -1), -1
    for position, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith(".*"):
                package = entry[:-2]
                matches, rank = module == package or module.startswith(package + "."), (0, len(package))
            else:
                matches, rank = module == entry, (1, len(entry))
            if matches and rank > best:
                best, index = rank, position
    if index < 0:
        raise ValueError(f"module {module} is in no layer of tests/import_graph.py's LAYERS; add it there.")
    return index


def _peer(module: str) -> str | None:
    return next((package for package in PEERS if module == package or module.startswith(package + ".")), None)


def upward_imports(graph: Graph) -> list[Import]:
    """Imports of a higher layer, or between the PEERS packages."""
    bad = []
    for imp in graph.imports:
        source_peer, target_peer = _peer(imp.source), _peer(imp.target)
        if layer_of(imp.target) > layer_of(imp.source) or (source_peer and target_peer and source_peer != target_peer):
            bad.append(imp)
    return bad


def circles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges = graph.edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        # Iterative Tarjan: (node, iterator over its successors).
        work = [(node, iter(sorted(edges[node])))]
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        while work:
            current, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found, key=lambda c: (-len(c), c))


def largest(graph: Graph) -> tuple[tuple[int, str], tuple[int, str]]:
    """(lines, module) of the longest module and (lines, module.function) of the longest function."""
    module_best, function_best = (0, ""), (0, "")
    for name, path in graph.modules.items():
        text = path.read_text()
        module_best = max(module_best, (len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                function_best = max(function_best, (node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return module_best, function_best


def report(root: Path) -> str:
    graph = read_graph(root)
    lines = [f"{len(graph.modules)} modules, {len(graph.imports)} mmcl imports "
             f"({sum(imp.lazy for imp in graph.imports)} inside functions)"]
    found = circles(graph)
    lines.append(f"circles: {len(found)}")
    lines += [f"  {len(c)} modules: {' '.join(c)}" for c in found]
    try:
        bad = upward_imports(graph)
        lines.append(f"upward imports (against LAYERS and PEERS): {len(bad)}")
        lines += [f"  {imp.source}:{imp.line} -> {imp.target}{' (in a function)' if imp.lazy else ''}" for imp in bad]
    except ValueError as error:
        lines.append(f"upward imports: not computed ({error})")
    typed = circles(read_graph(root, type_checking=True))
    lines.append(f"circles counting `if TYPE_CHECKING:` imports too: {len(typed)}")
    lines += [f"  {len(c)} modules: {' '.join(c)}" for c in typed]
    (module_lines, module), (function_lines, function) = largest(graph)
    lines.append(f"largest module: {module} ({module_lines} lines); largest function: {function} ({function_lines} lines)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
