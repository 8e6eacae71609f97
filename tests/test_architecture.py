"""The shape of the code (docs/architecture.md), checked by parsing every module of src/bcu with
``ast``: no import cycle among module-level imports, no method file importing another method's
file, no lazy import of a bcu module inside a function, no unguarded POSIX-only import."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "bcu"


def modules() -> Dict[str, Path]:
    """Dotted name -> file of every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for f in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> List[ast.stmt]:
    """Import statements that run when the module is imported: at the top level, in top-level
    ``if``/``try``/``with`` blocks and class bodies -- not in functions, not under TYPE_CHECKING."""
    found: List[ast.stmt] = []

    def visit(body: List[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def targets(importer: str, node: ast.stmt) -> Set[str]:
    """The bcu modules an import statement of module ``importer`` loads: ``import bcu.x``, absolute
    and relative ``from`` imports, ``from . import name`` resolved to the submodule ``name`` when
    there is one (else to the package itself)."""
    out: Set[str] = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                out.add(a.name if a.name in MODULES else a.name.rsplit(".", 1)[0])
        return out
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod: Optional[str] = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module
    if not mod or not (mod == PACKAGE or mod.startswith(PACKAGE + ".")):
        return out
    for a in node.names:
        sub = f"{mod}.{a.name}"
        out.add(sub if sub in MODULES else mod)
    return out


def import_graph() -> Dict[str, Set[str]]:
    graph = {}
    for name, f in MODULES.items():
        tree = ast.parse(f.read_text(), str(f))
        graph[name] = {t for node in module_level_imports(tree) for t in targets(name, node)} - {name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def dfs(n: str) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = dfs(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = dfs(n)
            if c:
                return c
    return None


def test_the_checker_resolves_relative_imports_and_finds_cycles():
    def resolve(importer: str, code: str) -> List[Set[str]]:
        return [targets(importer, n) for n in ast.parse(code).body]

    assert resolve("bcu.defenses.ft", "from . import tracing\nfrom .base import Run\nfrom ..config import check\n"
                   "from .. import seeding\nfrom ..data import augment, ImageSet\nimport torch\n") == [
        {"bcu.defenses.tracing"}, {"bcu.defenses.base"}, {"bcu.config"}, {"bcu.seeding"},
        {"bcu.data.augment", "bcu.data"}, set()]
    assert resolve("bcu", "from . import __version__\nfrom .defenses import bcu\nimport bcu.train\n") == [
        {"bcu"}, {"bcu.defenses.bcu"}, {"bcu.train"}]  # a name that is not a submodule: the package itself
    assert resolve("bcu.data", "from .load import load_dataset\n") == [{"bcu.data.load"}]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    lazy = ast.parse("import os\nif TYPE_CHECKING:\n    import bcu.cli\ndef f():\n    import bcu.cli\n")
    assert [type(n).__name__ for n in module_level_imports(lazy)] == ["Import"]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["bcu.cli"] >= {"bcu.workflows"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_bcu_module_is_imported_inside_a_function():
    """With no cycle to dodge, every import of a bcu module sits at the top of its module."""
    lazy = []
    for name, f in MODULES.items():
        tree = ast.parse(f.read_text(), str(f))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and targets(name, node):
                        lazy.append(f"{f.relative_to(SRC)}:{node.lineno}")
    assert not lazy, lazy


METHOD_FILES = {"anp", "bcu", "clp", "fp", "ft", "ibau", "mcr", "nad"}
BCU_PARTS = {"reinit", "adversary", "synthesis"}  # parts of bcu's own method, used only by it


@pytest.mark.parametrize("package,own", [("defenses", METHOD_FILES), ("attacks", None)])
def test_no_method_file_imports_another(package, own):
    graph = import_graph()
    prefix = f"{PACKAGE}.{package}."
    files = {m for m in graph if m.startswith(prefix) and m[len(prefix):] not in ("base", "tracing", "finetune")}
    methods = {m for m in files if own is None or m[len(prefix):] in own}
    assert methods, package
    for m in sorted(methods):
        others = {t for t in graph[m] if t in files and t != m}
        if m == prefix + "bcu":
            others -= {prefix + p for p in BCU_PARTS}
        assert not others, f"{m} imports {sorted(others)}"
    for part in BCU_PARTS if package == "defenses" else ():
        users = {m for m, t in graph.items() if prefix + part in t and m.startswith(prefix)} - {
            prefix + "bcu", f"{PACKAGE}.{package}"}
        assert not users, f"{prefix + part} is imported by {sorted(users)}"


def test_posix_only_modules_are_imported_behind_a_platform_check():
    bare = []
    for name, f in MODULES.items():
        for node in ast.parse(f.read_text()).body:  # the top level itself, outside any if
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n in ("fcntl", "termios", "pwd", "grp", "resource") for n in names):
                bare.append(name)
    assert not bare, bare
