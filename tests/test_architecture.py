"""The package's layering, read from its source: imports go one way (no cycle, at module level
or inside functions), an underscore name never leaves its module or subpackage, and an import
inside a function says why it is there (keeping torch, matplotlib or scipy off start-up)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fashionlab"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "fashionlab.search.loop"
    target: str  # the imported fashionlab module
    names: tuple[str, ...]  # names taken from it (`from target import a, b`)
    line: int
    in_function: bool
    commented: bool  # a comment on the line or the line above


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if _type_checking(child):
            continue  # annotations only: no import at run time
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        yield child, inside
        yield from _walk(child, inside)


def _commented(lines: list[str], first: int, last: int) -> bool:
    """A comment on the statement's lines, or above it through a group of imports."""
    if any("#" in lines[i] for i in range(first, last + 1)):
        return True
    i = first - 1
    while i >= 0 and (lines[i].strip().startswith(("import ", "from ", "#", ")"))
                      or not lines[i].strip()  # the blank line between import groups
                      or (lines[i].startswith(" " * 8) and lines[i].strip().endswith(","))):
        if lines[i].strip().startswith("#") or "#" in lines[i]:
            return True
        i -= 1
    return False


def imports() -> list[Import]:
    found = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        for node, in_function in _walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(name, node)
                targets = []
                for alias in node.names:  # `from fashionlab import stats`: the module itself
                    sub = f"{module}.{alias.name}"
                    targets.append((sub, ()) if sub in MODULES else (module, (alias.name,)))
            else:
                continue
            commented = _commented(lines, node.lineno - 1, (node.end_lineno or node.lineno) - 1)
            for target, names in targets:
                if target in MODULES:
                    found.append(Import(name, target, names, node.lineno, in_function,
                                        commented))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def _owner(module: str) -> str:
    """The unit that may share underscore names: a module, or the subpackage it belongs to."""
    parts = module.split(".")
    if _is_package(module):
        return module
    return ".".join(parts[:-1]) if len(parts) > 2 else module


def test_the_import_graph_has_no_cycle():
    edges: dict[str, set[str]] = {}
    for imp in imports():
        # A package's __init__ re-exports its modules: an edge from the package to them,
        # never from a module back to its own package's __init__ (Python imports parents
        # first anyway).
        if imp.target != imp.module and not imp.module.startswith(imp.target + "."):
            edges.setdefault(imp.module, set()).add(imp.target)
    assert _cycles(edges) == []


def test_no_private_name_leaves_its_module_or_subpackage():
    leaks = [f"{imp.module}:{imp.line} imports {name} from {imp.target}"
             for imp in imports() for name in imp.names
             if name.startswith("_") and not name.startswith("__")
             and _owner(imp.module) != _owner(imp.target)]
    assert leaks == []


def test_imports_inside_functions_say_why():
    silent = [f"{imp.module}:{imp.line} imports {imp.target} inside a function"
              for imp in imports() if imp.in_function and not imp.commented]
    assert silent == []


# Standard modules that exist on one family of systems only (Unix or Windows).
PLATFORM_ONLY = {"fcntl", "resource", "termios", "tty", "pty", "pwd", "grp", "posix", "syslog",
                 "msvcrt", "winreg", "winsound", "_winapi"}


def test_nothing_platform_only_is_imported_at_module_level():
    """The package imports on Linux, macOS and Windows: a Unix- or Windows-only module is
    imported inside the function that needs it, behind a check of the platform."""
    found = []
    for name, path in MODULES.items():
        for node, in_function in _walk(ast.parse(path.read_text())):
            if in_function or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            found += [f"{name}:{node.lineno} imports {m}" for m in modules
                      if m.split(".")[0] in PLATFORM_ONLY]
    assert found == []


def test_the_checks_see_what_they_check():
    # Guards against a vacuous pass: the graph is the package's, with known edges in it.
    found = imports()
    assert len(MODULES) > 30
    edges = {(i.module, i.target) for i in found}
    assert ("fashionlab.study.run", "fashionlab.steps") in edges
    assert ("fashionlab.search.loop", "fashionlab.search.finish") in edges
    assert any(i.in_function for i in found)


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(edges: dict[str, set[str]], expected: list[list[str]]):
    assert _cycles(edges) == expected


def test_public_functions_named_like_their_modules_stay_functions():
    import fashionlab as fl
    import fashionlab.evaluate
    import fashionlab.predict
    from fashionlab.evaluate import Evaluation

    assert callable(fl.evaluate) and fl.evaluate.__module__ == "fashionlab.evaluate"
    assert callable(fl.predict) and fl.predict.__module__ == "fashionlab.predict"
    assert fl.Evaluation is Evaluation


LAZY_PACKAGES = ("fashionlab", "fashionlab.study", "fashionlab.integrations.mlflow")
# Modules imported without anything heavy: the lazy packages, and what a reporter of one's own
# (README: a custom reporter) imports.
LIGHT_MODULES = (*LAZY_PACKAGES, "fashionlab.progress")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_packages_give_every_name_they_list(package: str):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(module, name) is value  # bound on first use
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018 (the lookup is the test)


def test_a_stored_search_is_read_without_training_code():
    # `runs show`/`runs delete` of a search read its trials through fashionlab.trials: Optuna,
    # not torch (nor the search package, which trains).
    script = ("import sys\nimport fashionlab.trials, fashionlab.runs\n"
              "heavy = {'torch', 'matplotlib', 'fashionlab.search'} & set(sys.modules)\n"
              "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_importing_the_lazy_packages_loads_nothing_heavy():
    script = ("import sys\n"
              f"for package in {LIGHT_MODULES!r}:\n"
              "    __import__(package)\n"
              "heavy = {'torch', 'matplotlib', 'optuna', 'mlflow'} & set(sys.modules)\n"
              "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", script], check=True)
