"""Layering rules of docs/architecture.md, checked on the source (AST), not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dsv4"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / sub]


@pytest.mark.parametrize("sub,forbidden", [
    ("server", ("dsv4.model", "dsv4.cache")),  # the server talks to AsyncLLM only
    ("model", ("dsv4.engine", "dsv4.cache", "dsv4.server", "dsv4.llm")),
    ("config.py", ("dsv4.",)),  # config imports nothing from dsv4
    ("cache/block_manager.py", ("torch",)),  # pure-Python accounting
    ("cache/block_pool.py", ("torch",)),
    ("engine/scheduler.py", ("torch",)),
])
def test_layering(sub, forbidden):
    for path in files(sub):
        bad = [m for m in imports_of(path) if m.startswith(forbidden) or m in forbidden]
        assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_only_env_reads_the_environment():
    for path in PKG.rglob("*.py"):
        if path.name == "env.py":
            continue
        assert "os.environ" not in path.read_text(), f"{path.relative_to(PKG.parent)}"
