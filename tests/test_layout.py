"""The package's shape: imports only go down (no circle between modules, none from a lower subpackage to a
higher one) and no module grows past 600 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "st_synth"
# Lowest first: a subpackage imports only from those before it (cli.py and pipeline.py sit on top).
LAYERS = ["common", "testing", "model", "data", "generation", "evaluation", "cards", "training"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the st_synth modules it imports anywhere in its file (inside functions and
    TYPE_CHECKING blocks too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t for t in targets if t in modules] or [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and "st_synth.generation.builder" in graph["st_synth.generation.batch"]
    assert cycles(graph) == []


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_subpackages_import_only_those_below_them():
    upward = []
    for module, targets in import_graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here is not None and (there is None or there > here):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_datasets_are_read_in_one_place():
    """``load_dataset`` / ``load_from_disk`` are called by st_synth.data.reader alone (every stage reads through
    it); st_synth/testing builds its fixtures in place."""
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("load_dataset", "load_from_disk"):
                    callers.add(str(path.relative_to(PACKAGE)))
    assert callers == {"data/reader.py"}


def test_no_module_is_longer_than_600_lines():
    long = {path.name: n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}


def _named_in_docs() -> set[str]:
    root = PACKAGE.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    text += "".join(path.read_text(encoding="utf-8") for path in sorted((root / "docs").glob("*.md")))
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def undocumented(named: set[str], package: Path = PACKAGE) -> list[str]:
    """The public classes and functions of st_synth (and the public methods of such classes) whose name is in
    ``named`` and that have no docstring, as ``module-path:Name[.method]``."""
    missing = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            if node.name in named and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(package)}:{node.name}")
            if isinstance(node, ast.ClassDef) and node.name in named:
                for method in node.body:
                    if (isinstance(method, ast.FunctionDef) and not method.name.startswith("_")
                            and method.name in named and not ast.get_docstring(method)):  # fmt: skip
                        missing.append(f"{path.relative_to(package)}:{node.name}.{method.name}")
    return missing


def test_what_readme_and_docs_name_has_a_docstring():
    import st_synth

    named = _named_in_docs() | set(st_synth.__all__)
    assert {"SyntheticDatasetBuilder", "prepare_sources", "build"} <= named
    assert undocumented(named) == []


def test_a_missing_docstring_is_found(tmp_path):
    (tmp_path / "mod.py").write_text(
        'class Named:\n    def build(self):\n        pass\n\n    def quiet(self):\n        """Said."""\n\n\n'
        "def helper():\n    pass\n\n\ndef _private():\n    pass\n"
    )
    assert undocumented({"Named", "build", "quiet", "helper", "_private"}, tmp_path) == [
        "mod.py:Named", "mod.py:Named.build", "mod.py:helper",
    ]  # fmt: skip
    assert undocumented({"helper"}, tmp_path) == ["mod.py:helper"]  # only the names the docs use
