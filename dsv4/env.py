"""The only reader of os.environ: typed DSV4_* settings, read when asked (not at import)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "api_key", "ops_overrides", "triton_interpret"]


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


def ops_overrides() -> str:
    """$DSV4_OPS: per-op backend choices, e.g. "rms_norm=torch,sparse_attention=triton" ("" if
    unset); dsv4.ops parses it."""
    return os.environ.get("DSV4_OPS", "").strip()


def triton_interpret() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter ($TRITON_INTERPRET=1): the only
    way a Triton op may be chosen on a CPU device (tests)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
