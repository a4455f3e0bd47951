"""The shape of src/latentembed, read with ``ast`` (nothing is imported):

* no import cycle among its modules;
* no use of another file's underscore names (``from m import _x``, ``m._x``, ``obj._x`` where
  only another file defines ``_x``), and a private module (``_name.py``) imported only from
  inside its own package;
* layers import downward only: ops < modules, prompts, tokenization < models < training /
  evaluation.

Every import statement counts wherever it stands: inside a function (a lazy import is still
an edge) and under ``if TYPE_CHECKING:`` (no exemption). ``from . import x`` is an edge to
submodule ``x`` when x is a module, else to the package's ``__init__``. Importing a submodule
also runs its parents' ``__init__``; those implicit edges are not counted (every module would
otherwise close a circle through the package that holds it).

Run as a script (``python tests/test_structure.py``) to print every finding at once.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "latentembed"

# Rank of each layer (a package, or a module at the top of the package); a module may import only
# layers of its own rank or lower. The rest (atomic_io, bench, the CLI, the package's __init__)
# is not ranked: helpers every layer may use, or the top that imports everything.
LAYERS = {"ops": 0, "modules": 1, "prompts": 1, "tokenization": 1, "models": 2, "training": 3, "evaluation": 3}


class Module(NamedTuple):
    name: str  # dotted: latentembed.ops.masked_mean (a package's __init__ has the package's name)
    path: Path
    is_package: bool
    tree: ast.Module


class Import(NamedTuple):
    importer: str
    line: int
    target: str  # the module whose code the statement runs
    name: Optional[str]  # the name taken from ``target`` (None when the import binds a module)
    local: str  # the name it binds in the importer
    bound: Optional[str]  # the module that local name refers to (None: not a module)


def load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return modules


def _known_prefix(dotted: str, modules: dict) -> Optional[str]:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: Module, modules: dict) -> Iterator[Import]:
    """Every import of a latentembed module in ``module``, at any depth of its tree."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    target = _known_prefix(alias.name, modules)
                    if target is not None:
                        local, bound = (alias.asname, target) if alias.asname else (PACKAGE, PACKAGE)
                        yield Import(module.name, node.lineno, target, None, local, bound)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                local = alias.asname or alias.name
                if sub in modules:
                    yield Import(module.name, node.lineno, sub, None, local, sub)
                else:
                    target = _known_prefix(source, modules)
                    if target is not None:
                        yield Import(module.name, node.lineno, target, alias.name, local, None)


def import_graph(modules: dict) -> dict[str, set]:
    graph = {name: set() for name in modules}
    for module in modules.values():
        for imp in imports_of(module, modules):
            if imp.target != module.name:
                graph[module.name].add(imp.target)
    return graph


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _where(module: Module) -> str:
    """The module's file, relative to src/ when it lies there."""
    path = module.path
    return str(path.relative_to(SRC) if path.is_absolute() and path.is_relative_to(SRC) else path)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_problem(importer: str, target: str) -> Optional[str]:
    """A private module (a ``_x`` component) may be imported from inside its own package only."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        owner = ".".join(parts[:i])
        if _is_private(part) and not (importer == owner or importer.startswith(owner + ".")):
            return f"imports {target}, private to {owner}"
    return None


def private_uses(modules: dict) -> list[str]:
    """Every use, in one file, of a private name or module of another file (see the docstring)."""
    defined = {name: _defined_private_names(m.tree) for name, m in modules.items()}
    problems = []
    for module in modules.values():
        where = _where(module)
        bound = {}  # local name -> the latentembed module it refers to
        for imp in imports_of(module, modules):
            if imp.bound is not None:
                bound[imp.local] = imp.bound
            problem = _private_module_problem(module.name, imp.target)
            if problem is None and imp.name is not None and _is_private(imp.name):
                problem = f"imports {imp.name} from {imp.target}"
            if problem is not None:
                problems.append(f"{where}:{imp.line}: {problem}")
        elsewhere = set().union(*(names for name, names in defined.items() if name != module.name))
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
                continue
            owner = _attribute_module(node.value, bound, modules)
            if owner is not None:
                sub = f"{owner}.{node.attr}"
                problem = _private_module_problem(module.name, sub) if sub in modules else f"uses {owner}.{node.attr}"
                if problem is not None:
                    problems.append(f"{where}:{node.lineno}: {problem}")
            elif node.attr in elsewhere and node.attr not in defined[module.name] and not _is_self(node.value):
                problems.append(f"{where}:{node.lineno}: uses .{node.attr}, defined only in other files")
    return sorted(set(problems))


def _defined_private_names(tree: ast.Module) -> set:
    """Underscore names a file defines: functions, methods, classes, variables and the
    attributes it sets on ``self`` / ``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_self(node.value):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


def _is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _attribute_module(node: ast.expr, bound: dict, modules: dict) -> Optional[str]:
    """The latentembed module an expression such as ``checks`` or ``latentembed.ops`` names."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _attribute_module(node.value, bound, modules)
        if owner is not None and f"{owner}.{node.attr}" in modules:
            return f"{owner}.{node.attr}"
    return None


def layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def upward_imports(modules: dict) -> list[str]:
    problems = []
    for module in modules.values():
        own = layer_of(module.name)
        if own is None:
            continue
        for imp in imports_of(module, modules):
            theirs = layer_of(imp.target)
            if theirs is not None and theirs > own:
                problems.append(
                    f"{_where(module)}:{imp.line}: {module.name.split('.')[1]} imports {imp.target} (a higher layer)"
                )
    return sorted(problems)


def test_no_import_cycles():
    found = cycles(import_graph(load_modules()))
    assert not found, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


def test_no_private_names_across_files():
    found = private_uses(load_modules())
    assert not found, "private names used across files:\n" + "\n".join("  " + p for p in found)


def test_layers_import_downward_only():
    found = upward_imports(load_modules())
    assert not found, (
        "upward imports (ops < modules, prompts, tokenization < models < training, evaluation):\n"
        + "\n".join("  " + p for p in found)
    )


def test_the_checker_sees_lazy_relative_and_private_imports():
    """The rules above on a made-up package: what they must flag and what they must not."""

    def module(name: str, text: str = "") -> Module:
        return Module(name, Path(*name.split(".")).with_suffix(".py"), False, ast.parse(text))

    def package(name: str, text: str = "") -> Module:
        return Module(name, Path(*name.split("."), "__init__.py"), True, ast.parse(text))

    fake = {
        m.name: m
        for m in (
            package("latentembed"),
            package("latentembed.ops", "from . import _private\nfrom ._private import helper\n"),
            module("latentembed.ops._private", "def helper(): pass\ndef _hidden(): pass\n"),
            package("latentembed.modules"),
            module(
                "latentembed.modules.a",
                "from ..ops import _private\nfrom ..ops._private import _hidden\n"
                "def f():\n    from . import b\n    from ..models import m\n"
                "    return _private._hidden\ndef g(obj):\n    return obj._state\n",
            ),
            module("latentembed.modules.b", "from .a import f\nclass B:\n    def _state(self): pass\n"),
            package("latentembed.models"),
            module("latentembed.models.m"),
        )
    }
    # a lazy import closes a cycle; `from . import b` is an edge to the submodule b
    assert cycles(import_graph(fake)) == [["latentembed.modules.a", "latentembed.modules.b"]]
    private = private_uses(fake)
    # inside its own package (ops/__init__.py) a private module is fine; outside it, and any
    # _name of another file, is not
    assert private == [
        "latentembed/modules/a.py:1: imports latentembed.ops._private, private to latentembed.ops",
        "latentembed/modules/a.py:2: imports latentembed.ops._private, private to latentembed.ops",
        "latentembed/modules/a.py:6: uses latentembed.ops._private._hidden",
        "latentembed/modules/a.py:8: uses ._state, defined only in other files",
    ], private
    assert upward_imports(fake) == ["latentembed/modules/a.py:5: modules imports latentembed.models.m (a higher layer)"]


if __name__ == "__main__":
    all_modules = load_modules()
    for title, found in (
        ("CYCLES", [" <-> ".join(c) for c in cycles(import_graph(all_modules))]),
        ("PRIVATE NAMES ACROSS FILES", private_uses(all_modules)),
        ("UPWARD IMPORTS", upward_imports(all_modules)),
    ):
        print(f"{title}: {len(found)}")
        for line in found:
            print("  " + line)
