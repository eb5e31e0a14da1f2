"""The package's shape, checked from its source: no import cycles, imports run one way through the stages,
only the command line imports the command line, and ``import layertap`` stays light.

The import graph is read with ``ast`` (nothing is imported), so an import hidden inside a function to dodge
a cycle counts like any other. Edges: ``import a.b`` -> ``a.b`` (a package's ``__init__``);
``from a import b`` -> ``a.b`` where ``a/b`` is a module or package, else ``a``; relative imports are
resolved; imports under ``if TYPE_CHECKING:`` are left out (they never run). A package's lazy export table
(``_NAMES``/``_SUBMODULES``, served by ``layertap._lazy.lazy_exports``) counts as imports of the modules it names:
they are imported the first time a name is used, so ``lt.*`` depends on them as surely as on a plain import.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "layertap"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The stages, lowest first; a module may import only from its own stage or an earlier one. Why this order
# (each stage uses only what is above it):
# - base: errors, the optional-dependency, device, glob, units and lazy-export helpers, hashing, the version:
#   used everywhere, they use nothing of the package but each other.
# - models: sources + weights + transforms; needs only base.
# - data: stimuli (images, movies, arrays); a model's transform is handed in, so data needs only base
#   (after models because what a stimulus set yields, frames or clips, follows the model's input).
# - store: the run format (reader, writer, manifest, export); what every later stage reads or writes.
# - shards: a run split into shards (shard specs, merging, launching, Slurm scripts) is a store-level matter:
#   it uses only the store; extraction asks it which slice to compute and merges when the last shard ends.
# - process: PCA / projections / ensembles over a store; extraction's random-projection reducer uses it.
# - extraction: layers, taps, reducers, planning, the batch loop; writes a store, uses models + data + process.
# - analysis: RDMs, similarity, plots, reports over stored runs.
# - encode: encoding models fitted on stored runs (uses analysis' RDM helpers).
# - clip, training: text embeddings of CLIP models; IPCL training + probes (they load models and extract).
# - cli: the command line, on top of everything.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("errors", "_optional", "_version", "_lazy", "globs", "units", "hashing", "devices")),
    ("models", ("models",)),
    ("data", ("data",)),
    ("store", ("store",)),
    ("shards", ("shards",)),
    ("process", ("process",)),
    ("extraction", ("extraction",)),
    ("analysis", ("analysis",)),
    ("encode", ("encode",)),
    ("training", ("clip", "training")),
    ("cli", ("cli", "__main__")),
]
# The top-level package: its lazy ``lt.*`` table reaches every stage, so it sits above all of them and no
# module of the package may import it (the version is in ``layertap._version`` for that reason).
TOP = PACKAGE
LAZY_TABLES = ("_NAMES", "_SUBMODULES")


def module_name(path: Path) -> str:
    """``layertap/store/run.py`` -> ``layertap.store.run``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects (line, absolute module, imported names) of every import at any depth, except TYPE_CHECKING."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str, list[str]]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # only the else branch runs
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node.lineno, alias.name, []))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((node.lineno, target, [a.name for a in node.names]))


def lazy_imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """The modules a package's lazy export tables name, as (line, module, []) imports."""
    if path.name != "__init__.py":
        return []
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in LAZY_TABLES for t in node.targets):
            table = ast.literal_eval(node.value)
            targets = table.values() if isinstance(table, dict) else table
            out += [(node.lineno, f"{module}.{t}", []) for t in targets]
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported layertap module: first line}} over the whole package."""
    modules = all_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found = visitor.found + lazy_imports(name, path)
        edges: dict[str, int] = {}
        for line, target, names in found:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            # names that are not submodules come from the module itself
            if not names or len(hits) < len(names):
                hits.append(target)
            for hit in hits:
                if hit != name:
                    edges.setdefault(hit, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """(one shortest cycle, all its modules) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first search back to start inside the component: the shortest cycle through start
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append(([*reversed(path), start], component))
    return cycles


def stage_of(module: str) -> int:
    """The stage index of a module (``layertap`` itself: above the last stage)."""
    if module == TOP:
        return len(STAGES)
    first = module.split(".")[1]
    for i, (_, prefixes) in enumerate(STAGES):
        if first in prefixes:
            return i
    raise AssertionError(f"{module} is in no stage: add it to STAGES in {Path(__file__).name}")


def stage_label(module: str) -> str:
    i = stage_of(module)
    return STAGES[i][0] if i < len(STAGES) else "the lt.* table"


def _describe(graph: dict[str, dict[str, int]], a: str, b: str) -> str:
    return f"{a} -> {b} ({all_modules()[a].relative_to(ROOT.parent)}:{graph[a][b]})"


def test_graph_reader_sees_hidden_and_relative_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import layertap.store.run\n"
        "from . import hashing\n"
        "from .models import registry, Source\n"
        "if TYPE_CHECKING:\n    from layertap.cli import main\n"
        "def f():\n    from layertap.errors import LayertapError\n"
    )
    visitor = _Imports("layertap.x", is_package=False)
    visitor.visit(ast.parse(source))
    targets = {(t, tuple(n)) for _, t, n in visitor.found}
    assert ("layertap.store.run", ()) in targets
    assert ("layertap", ("hashing",)) in targets
    assert ("layertap.models", ("registry", "Source")) in targets
    assert ("layertap.errors", ("LayertapError",)) in targets  # inside a function
    assert not any(t.startswith("layertap.cli") for t, _ in targets)  # TYPE_CHECKING only
    # the lazy lt.* table is read as imports of what it names
    lazy = {t for _, t, _ in lazy_imports(PACKAGE, ROOT / "__init__.py")}
    assert {"layertap.store.run", "layertap.models.registry", "layertap.analysis"} <= lazy
    # a made-up cycle is found and spelled out
    made_up = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(made_up) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    lines = [
        f"{' -> '.join(c)}  (all modules of this cycle: {', '.join(members)})\n    "
        + "\n    ".join(_describe(graph, a, b) for a, b in zip(c, c[1:], strict=False))
        for c, members in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_imports_run_down_the_stages() -> None:
    graph = import_graph()
    upward = [
        _describe(graph, a, b) + f"  [{stage_label(a)} imports {stage_label(b)}]"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if stage_of(b) > stage_of(a) and a != TOP
    ]
    assert not upward, "imports of a later stage:\n" + "\n".join(upward)


def test_only_the_cli_imports_the_cli() -> None:
    graph = import_graph()
    bad = [
        _describe(graph, a, b)
        for a in sorted(graph)
        for b in sorted(graph[a])
        if (b == f"{PACKAGE}.cli" or b.startswith(f"{PACKAGE}.cli.")) and not a.startswith(f"{PACKAGE}.cli")
        and a != f"{PACKAGE}.__main__"
    ]
    assert not bad, "library modules importing the command line:\n" + "\n".join(bad)


def test_lazy_table_resolves_every_name() -> None:
    import layertap as lt

    table = lt._NAMES
    assert sorted(lt.__all__) == sorted({*table, *lt._SUBMODULES}), "__all__ and the lazy table differ"
    for name, where in table.items():
        module = importlib.import_module(f"{PACKAGE}.{where}")
        obj = getattr(lt, name)
        assert obj is getattr(module, name), name
        # the documented object: defined under that name, with a docstring
        assert getattr(obj, "__name__", name) == name, f"lt.{name} is {obj!r}"
    for name in lt._SUBMODULES:
        assert getattr(lt, name) is importlib.import_module(f"{PACKAGE}.{name}")
    with pytest.raises(AttributeError):
        lt.no_such_name  # noqa: B018


def missing_sections(obj: object) -> list[str]:
    """The Google-style sections ``obj``'s docstring lacks: Args (a function with parameters), Returns (one
    that returns something), Example (functions and classes; exceptions need only a docstring)."""
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return ["a docstring"]
    if inspect.isclass(obj):
        return [] if issubclass(obj, BaseException) or "Example" in doc else ["Example"]
    sig = inspect.signature(obj)  # a function: classes returned above
    missing = []
    if any(p not in ("self", "cls") for p in sig.parameters) and "Args:" not in doc:
        missing.append("Args")
    if sig.return_annotation not in (None, "None") and "Returns:" not in doc and "Yields:" not in doc:
        missing.append("Returns")
    if "Example" not in doc:
        missing.append("Example")
    return missing


def test_public_api_has_google_style_docstrings() -> None:
    import layertap as lt

    bad = [
        f"lt.{name} ({PACKAGE}.{where}): no {', '.join(missing)}"
        for name, where in lt._NAMES.items()
        if (missing := missing_sections(getattr(lt, name)))
    ]
    assert not bad, "lt.* names whose docstrings lack sections:\n" + "\n".join(bad)


# Packages whose every public function and class is documented (Args / Returns / Example), and whose examples
# run as doctests here. Add a package once its docstrings are complete.
DOCUMENTED = ("models", "data", "training", "clip", "hashing", "_lazy", "_version", "errors")


def documented_modules() -> list[str]:
    return sorted(m for m in all_modules() if m != TOP and m.split(".")[1] in DOCUMENTED)


def test_documented_packages_have_google_style_docstrings() -> None:
    bad = []
    for name in documented_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            public = not attr.startswith("_") and getattr(obj, "__module__", None) == name
            if public and (inspect.isfunction(obj) or inspect.isclass(obj)) and (missing := missing_sections(obj)):
                bad.append(f"{name}.{attr}: no {', '.join(missing)}")
    assert not bad, "public functions / classes whose docstrings lack sections:\n" + "\n".join(bad)


def test_documented_examples_run() -> None:
    import doctest

    failures = []
    for name in documented_modules():
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
        if result.failed:
            failures.append(f"{name}: {result.failed} of {result.attempted} examples fail")
    assert not failures, "\n".join(failures) + "\n(run: pytest --doctest-modules <module file>)"


def test_import_layertap_does_not_import_torch() -> None:
    code = "import sys, layertap; dir(layertap); print(sorted(m for m in ('torch', 'numpy', 'zarr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
