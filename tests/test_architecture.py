"""The layers of vizkit/ and who may import whom, checked on the source (ARCHITECTURE.md describes them).

Every module under vizkit/ is parsed with ``ast`` (nothing is imported, so the check runs even when the
package does not). An import is any ``import x``, ``from x import y`` or relative ``from . import y``,
at module level or inside a function (a lazy import runs too, only later), plus
``importlib.import_module("literal")``. ``from vizkit.core import pictures`` is an import of the module
``vizkit.core.pictures``; ``from vizkit.core.errors import ConfigError`` one of ``vizkit.core.errors``.

Exempt: imports under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): they never execute, only
type checkers read them (the ``else:`` branch of such an ``if`` does execute and is checked).

The rules:

(a) No import cycles among vizkit modules. The graph has an edge A -> B for every import in A that
    names module B, lazy imports included. Only the named module counts, not the parent packages that
    Python initializes on the way (``import vizkit.core.errors`` also runs ``vizkit/__init__.py``):
    counting those would make every package ``__init__`` that imports its own submodules a cycle
    with each of them. A package that imports its submodules is fine; a submodule that imports its
    package back (``from vizkit.metrics import ...`` inside ``vizkit/metrics/base.py``) is a cycle.
    A module naming itself is no cycle between modules and is ignored.
(b) The method and metric layers, and every layer they may import, import none of the run-time
    frameworks (``FRAMEWORKS``: Hydra, OmegaConf, Lightning, TensorBoard); ``vizkit.run``,
    ``vizkit.output`` and ``vizkit.cli`` are kept out of them by (c).
(c) Each layer imports only the layers ``LAYERS`` allows it; every module belongs to a layer, and
    every vizkit module imported exists.
(d) Only ``vizkit.cli`` imports Hydra or OmegaConf: nothing below the command receives a raw DictConfig.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vizkit"

# layer -> the layers its modules may import (its own included). "api" is vizkit/__init__.py alone,
# the small public Python API; every other layer is a subpackage vizkit/<layer>/.
LAYERS: dict[str, set[str]] = {
    "core": {"core"},
    "probes": {"core", "probes"},
    "optimize": {"core", "probes", "optimize"},
    "methods": {"core", "probes", "optimize", "methods"},
    "metrics": {"core", "probes", "methods", "metrics"},
    "output": {"core", "output"},
    "run": {"core", "probes", "optimize", "methods", "metrics", "output", "run"},
    "cli": {"core", "probes", "optimize", "methods", "metrics", "output", "run", "cli"},
    "api": {"core", "probes", "optimize", "methods", "metrics", "api"},
}

# (b) what the method and metric layers, and everything they stand on, never import
FRAMEWORKS = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "tensorboard", "torch.utils.tensorboard")
FRAMEWORK_FREE = LAYERS["methods"] | LAYERS["metrics"]

# (d) only this layer imports these
CONFIG_LIBRARIES = ("hydra", "omegaconf")
CONFIG_LAYER = "cli"


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, dotted
    path: Path
    line: int
    text: str  # the statement as written
    lazy: bool  # inside a function
    names: tuple[str, ...]  # every dotted name it may load: ``from a.b import c`` -> (a.b, a.b.c)
    source: str  # ``from X import ...``: X; ``import X``: X (absolute)

    def where(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.importer}: `{self.text}`{' (in a function)' if self.lazy else ''}"


# ---------------------------------------------------------------------------------------------------
# the analysis (shared by the tests on vizkit/ and the self-test on a planted package)


def modules_of(package_dir: Path, package: str) -> dict[str, Path]:
    """Every module of a package directory, by dotted name (``pkg/a/__init__.py`` -> ``pkg.a``)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, is_package: bool, source: str) -> None:
        self.module, self.path, self.is_package, self.source = module, path, is_package, source
        self.depth = 0  # functions we are inside
        self.found: list[Import] = []

    def _add(self, node: ast.AST, source: str, names: tuple[str, ...]) -> None:
        text = " ".join((ast.get_source_segment(self.source, node) or "").split())
        self.found.append(Import(self.module, self.path, node.lineno, text, self.depth > 0, names, source))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never executes: exempt (its else: branch does execute)
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        # decorators and defaults run at definition time; the body when called
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, (alias.name,))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            source = ".".join(part for part in (package, node.module) if part)
        else:
            source = node.module or ""
        if source == "__future__":
            return
        self._add(node, source, (source, *(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            self._add(node, node.args[0].value, (node.args[0].value,))
        self.generic_visit(node)


def imports_of(module: str, path: Path) -> list[Import]:
    source = path.read_text(encoding="utf-8")
    collector = _Collector(module, path, path.name == "__init__.py", source)
    collector.visit(ast.parse(source, filename=str(path)))
    return collector.found


def all_imports(package_dir: Path, package: str) -> list[Import]:
    return [found for module, path in modules_of(package_dir, package).items() for found in imports_of(module, path)]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def targets(found: Import, modules: dict[str, Path], package: str) -> list[str]:
    """The package's modules an import names (``from a import b``: ``a.b`` when that is a module, else ``a``)."""
    if not _within(found.source, package):
        return []
    named = [name for name in found.names[1:] if name in modules]
    if len(named) < len(found.names) - 1 or len(found.names) == 1:  # a name that is not a module comes from `source`
        named.append(found.source)
    return [name for name in dict.fromkeys(named) if name in modules]


def layer_of(module: str, package: str) -> str | None:
    parts = module.split(".")
    if parts == [package]:
        return "api"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS and parts[1] != "api" else None


def import_graph(package_dir: Path, package: str) -> dict[str, dict[str, Import]]:
    """module -> {module it imports: the first import that names it}; self-imports left out."""
    modules = modules_of(package_dir, package)
    graph: dict[str, dict[str, Import]] = {module: {} for module in modules}
    for found in all_imports(package_dir, package):
        for target in targets(found, modules, package):
            if target != found.importer:
                graph[found.importer].setdefault(target, found)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle (a list of modules, first repeated last) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        members, start = set(component), component[0]
        parents: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in parents:  # breadth first, back to the start
            following = []
            for node in frontier:
                for successor in sorted(graph[node]):
                    if successor in members and successor not in parents:
                        parents[successor] = node
                        following.append(successor)
            frontier = following
        path = [start]
        node = parents[start]
        while node != start:
            path.append(node)
            node = parents[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def cycle_violations(package_dir: Path, package: str) -> list[str]:
    graph = import_graph(package_dir, package)
    root = package_dir.parent
    return ["import cycle " + " -> ".join(cycle) + "\n" + "\n".join(
        f"    {graph[a][b].where(root)}" for a, b in zip(cycle, cycle[1:])) for cycle in find_cycles(graph)]


def layer_violations(package_dir: Path, package: str) -> list[str]:
    """(c): every module in a layer, every vizkit import of an existing module of an allowed layer."""
    modules = modules_of(package_dir, package)
    root = package_dir.parent
    problems = [f"{path.relative_to(root)}: {module} is in no layer of LAYERS (add its layer to the table and ARCHITECTURE.md)"
                for module, path in modules.items() if layer_of(module, package) is None]
    for found in all_imports(package_dir, package):
        if not _within(found.source, package):
            continue
        if found.source not in modules:
            problems.append(f"{found.where(root)}: {found.source} is no module of {package}")
            continue
        layer = layer_of(found.importer, package)
        for target in targets(found, modules, package):
            used = layer_of(target, package)
            if layer is not None and used is not None and used not in LAYERS[layer]:
                problems.append(f"{found.where(root)}: layer '{layer}' imports {target} (layer '{used}'); "
                                f"'{layer}' may import only {', '.join(sorted(LAYERS[layer]))}")
    return problems


def external_violations(package_dir: Path, package: str, banned: tuple[str, ...], applies, rule: str) -> list[str]:
    """Imports of ``banned`` (dotted prefixes) in the modules whose layer ``applies`` to."""
    root = package_dir.parent
    problems = []
    for found in all_imports(package_dir, package):
        layer = layer_of(found.importer, package)
        if not applies(layer):
            continue
        hit = sorted({prefix for prefix in banned for name in found.names if _within(name, prefix)})
        if hit:
            problems.append(f"{found.where(root)}: layer '{layer}' imports {', '.join(hit)} ({rule})")
    return problems


def framework_violations(package_dir: Path, package: str) -> list[str]:
    return external_violations(package_dir, package, FRAMEWORKS, lambda layer: layer in FRAMEWORK_FREE,
                               "methods, metrics and the layers below them are plain torch: no Hydra, OmegaConf, Lightning or TensorBoard")


def config_library_violations(package_dir: Path, package: str) -> list[str]:
    return external_violations(package_dir, package, CONFIG_LIBRARIES, lambda layer: layer != CONFIG_LAYER,
                               f"only vizkit.{CONFIG_LAYER} imports Hydra or OmegaConf: nothing below the command sees a DictConfig")


# ---------------------------------------------------------------------------------------------------
# vizkit/

PACKAGE_DIR = ROOT / PACKAGE


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_the_package_is_found():
    modules = modules_of(PACKAGE_DIR, PACKAGE)
    assert PACKAGE in modules and f"{PACKAGE}.core.errors" in modules, sorted(modules)


def test_no_import_cycles():
    _fail_on(cycle_violations(PACKAGE_DIR, PACKAGE), "import cycle(s) among vizkit modules (rule a)")


def test_methods_and_metrics_import_no_runtime_framework():
    _fail_on(framework_violations(PACKAGE_DIR, PACKAGE), "framework import(s) in methods, metrics or below (rule b)")


def test_each_layer_imports_only_the_layers_below_it():
    _fail_on(layer_violations(PACKAGE_DIR, PACKAGE), "import(s) across the layer table (rule c)")


def test_only_the_cli_imports_hydra_or_omegaconf():
    _fail_on(config_library_violations(PACKAGE_DIR, PACKAGE), "Hydra/OmegaConf import(s) outside vizkit.cli (rule d)")


# ---------------------------------------------------------------------------------------------------
# the checker itself, on a planted package: it must find what is there and only that


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_planted_cycles_and_forbidden_imports(tmp_path):
    package_dir = _plant(tmp_path, {
        "__init__.py": "from pkg.methods import base\n",
        "core/__init__.py": "",
        "core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.run import r\n\n"
                     "def later():\n    from pkg.core import b\n",
        "core/b.py": "from . import a\n",  # a -> b (lazy) -> a: a cycle
        "core/c.py": "import pkg.output.writer\n",  # core above itself
        "methods/__init__.py": "from . import base\n",  # a package importing its submodule: fine
        "methods/base.py": "from pkg.core import a\n",
        "methods/m.py": "def f():\n    from torch.utils import tensorboard\n    import omegaconf\n",
        "output/__init__.py": "",
        "output/writer.py": "import numpy\n",
        "run/__init__.py": "",
        "run/r.py": "from omegaconf import DictConfig\nfrom pkg.core.missing import x\n",
        "cli/__init__.py": "",
        "cli/app.py": "import hydra\nfrom pkg.run import r\n",
    })
    cycles = cycle_violations(package_dir, "pkg")
    assert len(cycles) == 1 and cycles[0].startswith("import cycle pkg.core.a -> pkg.core.b -> pkg.core.a"), cycles
    assert "def later" not in cycles[0] and "from pkg.core import b` (in a function)" in cycles[0], cycles

    layers = layer_violations(package_dir, "pkg")
    assert len(layers) == 2, layers  # the TYPE_CHECKING import of pkg.run is exempt
    assert any("pkg/core/c.py:1: pkg.core.c: `import pkg.output.writer`" in p and "layer 'output'" in p for p in layers), layers
    assert any("pkg.core.missing is no module" in p for p in layers), layers

    frameworks = framework_violations(package_dir, "pkg")
    assert [p.split(": layer")[0] for p in frameworks] == [
        "pkg/methods/m.py:2: pkg.methods.m: `from torch.utils import tensorboard` (in a function)",
        "pkg/methods/m.py:3: pkg.methods.m: `import omegaconf` (in a function)",
    ], frameworks

    config = config_library_violations(package_dir, "pkg")
    assert [p.split(":")[0] for p in config] == ["pkg/methods/m.py", "pkg/run/r.py"], config
