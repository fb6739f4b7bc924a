"""The package's shape: modules stay small, and module-level imports inside it form no cycle."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dgate_cli"
MAX_LINES = 400


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def module_level_imports(name: str, path: Path, names: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports when it is imported (not in functions, not TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
                visit(node.orelse)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in names]
                if base in names and (len(subs) < len(node.names) or not name.startswith(base + ".")):
                    found.add(base)  # the module itself runs (a parent package is already imported)
                found.update(subs)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    found.discard(name)
    return found


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in module_names().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these modules along a responsibility: {long}"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    names = module_names(package)
    return {name: module_level_imports(name, path, names) for name, path in names.items()}


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    assert "dgate_cli.runtime.model" in graph["dgate_cli.runtime.loading"]  # the walk sees real edges
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_check_sees_a_cycle_through_a_package_reexport(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("thing = 1\n")
    (pkg / "a.py").write_text("from .sub import thing\n\ndef later():\n    from . import c\n")
    (pkg / "c.py").write_text("")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub"} and graph["pkg.sub"] == {"pkg.sub.b"}  # not the function-level import
    graphlib.TopologicalSorter(graph).prepare()
    (pkg / "sub" / "b.py").write_text("try:\n    from ..a import later\nexcept ImportError:\n    pass\n")
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(import_graph(pkg)).prepare()
