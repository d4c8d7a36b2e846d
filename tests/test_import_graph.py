"""The package's import graph: no cycles, and no upward imports.

Layers, bottom up: kernels < engine < server < bench (bench drives a server and reads its data loaders). A layer may
import only layers below it. The command line, `diffgentor.server.cli`, is the composition root: it may import
every layer (its `bench` subcommands), and no module of the package may import it.

Read with `ast`, so nothing is imported. Every `import` statement counts as an edge, including ones inside a
function body: a function-local import is still a run-time dependency, and hiding a cycle inside a function only
moves the failure from import time to call time. Imports under `if TYPE_CHECKING:` (annotations only, never run)
count too: for cycles and for upward imports (a kernel typed for an engine class depends on the engine's layout all
the same). There are no exemptions: an optional backend is loaded by a selection point above it
(kernels/attention_select.py), never by the module it builds on.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "diffgentor"
SUBPACKAGES = ("bench", "engine", "kernels", "server")
# a layer may not import the layers listed for it
FORBIDDEN = {"kernels": ("engine", "server", "bench"), "engine": ("server", "bench"), "server": ("bench",)}
ENTRY_POINTS = {"diffgentor.server.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def package_modules() -> dict[str, Path]:
    mods = {PACKAGE: REPO / "__init__.py"}
    for sub in SUBPACKAGES:
        for path in sorted((REPO / sub).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, local: set[str] | None = None,
             type_checking: bool = False) -> set[str]:
    """Absolute names of every module `tree` imports (the module itself for `from m import name`, plus `m.name`
    when that is a submodule: the caller filters to modules that exist). Names imported only inside a function
    body are also added to `local` when given; `if TYPE_CHECKING:` imports only with `type_checking`."""
    found: set[str] = set()
    top: set[str] = set()
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool = False) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for child in node.orelse:
                visit(child, in_function)
            return
        names: set[str] = set()
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = {target} | {f"{target}.{alias.name}" for alias in node.names}
        found.update(names)
        if not in_function:
            top.update(names)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree)
    if local is not None:
        local.update(found - top)
    return found


def import_graph(with_type_checking: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports (`if TYPE_CHECKING:` imports included unless left out)."""
    mods = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = _imports(tree, name, path.name == "__init__.py", type_checking=with_type_checking)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sccs


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_walker_sees_every_kind_of_import():
    src = (
        "import diffgentor.engine.config\n"
        "from diffgentor.kernels import moe\n"
        "from . import request\n"
        "from .request import GenerationRequest\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from diffgentor.server.http import api\n"
        "def f():\n"
        "    from diffgentor.engine.core import EngineCore\n"
    )
    local: set[str] = set()
    found = _imports(ast.parse(src), "diffgentor.engine.scheduler", is_package=False, local=local)
    assert {"diffgentor.engine.config", "diffgentor.kernels.moe", "diffgentor.engine.request",
            "diffgentor.engine.core"} <= found
    assert "diffgentor.server.http.api" not in found
    assert "diffgentor.server.http.api" in _imports(ast.parse(src), "diffgentor.engine.scheduler", is_package=False,
                                               type_checking=True)
    assert "diffgentor.engine.core" in local and "diffgentor.engine.config" not in local
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_covers_the_package():
    graph = import_graph()
    assert "diffgentor.engine.core" in graph and "diffgentor.kernels.moe" in graph
    assert "diffgentor.engine.config" in graph["diffgentor.engine.core"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_upward_imports():
    """Annotation-only imports included: a kernel typed for an engine class is an upward dependency too."""
    graph = import_graph()
    bad = [f"{src} imports {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
           if src not in ENTRY_POINTS and _layer(dst) in FORBIDDEN.get(_layer(src), ())]
    bad += [f"{src} imports the entry point {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
            if dst in ENTRY_POINTS]
    assert not bad, "\n".join(bad)


SERVER_CONCERNS = ("diffgentor.server.http", "diffgentor.server.batch")


def _concern(module: str) -> str | None:
    return next((c for c in SERVER_CONCERNS if module == c or module.startswith(c + ".")), None)


def test_server_concerns_do_not_import_each_other():
    """The HTTP API (`server/http/`) and the batch jobs (`server/batch/`) share only the modules at the root of
    `server/` (model-instance planning, URL fetching); the CLI root composes them."""
    graph = import_graph()
    bad = [f"{src} imports {dst}" for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
           if _concern(src) and _concern(dst) and _concern(src) != _concern(dst)]
    assert not bad, "\n".join(bad)


MODEL_PACKAGE = "diffgentor.engine.models"
MAX_ENGINE_TO_MODEL_EDGES = 10


def _in_model_package(module: str) -> bool:
    return module == MODEL_PACKAGE or module.startswith(MODEL_PACKAGE + ".")


def engine_to_model_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(engine module, model-package module) import edges, the model packages themselves left out as importers."""
    return sorted((src, dst) for src, dsts in graph.items() for dst in dsts
                  if _layer(src) == "engine" and not _in_model_package(src) and _in_model_package(dst))


def test_the_engine_reaches_the_model_through_a_handful_of_imports():
    """The scheduler, its plan's bookkeeping and the core know the model through engine/model_interface.py; the
    modules that do import a model package (input processing, request state, the plan's payload types, the worker
    side) do so through its faces. Annotation-only imports count."""
    edges = engine_to_model_edges(import_graph())
    listing = "\n".join(f"{s} -> {d}" for s, d in edges)
    assert len(edges) <= MAX_ENGINE_TO_MODEL_EDGES, f"{len(edges)} engine -> model imports:\n{listing}"
    importers = {s for s, _ in edges}
    for generic in ("scheduler", "core", "encoder_cache", "detokenizer", "kv_cache_manager", "cuda_graph",
                    "kernel_warmup"):
        assert f"diffgentor.engine.{generic}" not in importers, listing
