"""The only reader of os.environ: typed DSV4_* settings, read when asked (not at import)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "api_key"]


def cache_dir() -> Path:
    """Where dsv4 keeps what it builds (the demo checkpoint): $DSV4_CACHE_DIR, else
    $XDG_CACHE_HOME/dsv4, else ~/.cache/dsv4."""
    explicit = os.environ.get("DSV4_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv4"


def api_key() -> str | None:
    return os.environ.get("DSV4_API_KEY") or None


TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                      "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_USE_AGENT_STORE")


def torchrun() -> dict[str, str]:
    """torchrun's variables for this process ({} when torchrun did not start it)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    return {k: os.environ[k] for k in TORCHRUN_VARIABLES if k in os.environ}
