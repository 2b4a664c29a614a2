"""Layering rules of docs/architecture.md, checked on the source (AST), not by convention.

Every ``dsv4`` import counts, wherever it stands (module level, inside a function, under
TYPE_CHECKING): a module imports only from its own layer or the ones below, the import graph has
no cycles, and the server sees the engine only through its public surface.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dsv4"

# lowest first; a module's layer is that of its longest matching prefix
LAYERS = [
    ("dsv4.config", "dsv4.errors", "dsv4.env", "dsv4.device", "dsv4.logs", "dsv4.quant",
     "dsv4.sampling_params", "dsv4.structured_outputs", "dsv4.distributed",
     "dsv4.tokenizer", "dsv4.encoding", "dsv4.detokenizer"),
    ("dsv4.model", "dsv4.cache", "dsv4.demo", "dsv4.ops", "dsv4.kernels"),
    ("dsv4.engine",),
    ("dsv4.engine_args", "dsv4.input_processor", "dsv4.output_processor", "dsv4.async_llm",
     "dsv4.llm", "dsv4.analysis"),
    ("dsv4.server", "dsv4.cli", "dsv4.__main__", "dsv4"),
]
# the engine's public surface, for the server (it never reaches into the engine)
SERVER_MAY_IMPORT = ("dsv4.async_llm", "dsv4.engine.outputs", "dsv4.engine_args",
                     "dsv4.errors", "dsv4.input_processor", "dsv4.output_processor",
                     "dsv4.sampling_params", "dsv4.structured_outputs", "dsv4.tokenizer", "dsv4.encoding", "dsv4.env",
                     "dsv4.demo", "dsv4.device", "dsv4.logs", "dsv4.server")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """dsv4 modules imported by the file (``from dsv4 import env`` counts as dsv4.env)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
    return {n for n in names if n == "dsv4" or n.startswith("dsv4.")}


def all_imports_of(path: Path) -> set[str]:
    """Every module name the file imports, dsv4 or not."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")
                    or (prefix == "dsv4.encoding" and module.startswith("dsv4.encoding"))):
                if len(prefix) > best:
                    best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_back_edges(module):
    bad = [m for m in GRAPH[module] if layer(m) > layer(module)]
    assert not bad, f"{module} (layer {layer(module)}) imports higher layers: {bad}"


def test_import_graph_has_no_cycles():
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt in GRAPH and state.get(nxt) is None:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node != "dsv4" and state.get(node) is None:  # the package's __init__ re-exports
            visit(node)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("dsv4.server")))
def test_server_sees_only_the_public_surface(module):
    bad = [m for m in GRAPH[module]
           if not any(m == p or m.startswith(p + ".") or (p == "dsv4.encoding"
                                                          and m.startswith(p))
                      for p in SERVER_MAY_IMPORT)]
    assert not bad, f"{module} imports engine internals: {bad}"


@pytest.mark.parametrize("sub,forbidden", [
    ("model", ("dsv4.engine", "dsv4.cache")),  # the model knows no paging and no engine
    ("cache", ("dsv4.model", "dsv4.engine")),  # formats live below both, in dsv4.quant
    ("config.py", ("dsv4.",)),  # config imports nothing from dsv4
    ("cache/block_manager.py", ("torch",)),  # pure-Python accounting
    ("cache/block_pool.py", ("torch",)),
    ("engine/scheduler.py", ("torch",)),
])
def test_layering(sub, forbidden):
    paths = sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / sub]
    for path in paths:
        bad = [m for m in all_imports_of(path) if m.startswith(forbidden) or m in forbidden]
        assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_only_env_reads_the_environment():
    for path in PKG.rglob("*.py"):
        if path.name == "env.py":
            continue
        assert "os.environ" not in path.read_text(), f"{path.relative_to(PKG.parent)}"
