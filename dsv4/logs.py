"""Command-line logging: dsv4's INFO lines (the KV-cache size at load, ...) on stderr.

Idempotent, and it leaves propagation alone, so callers that capture logs (tests) still see
every record. ``dsv4 serve`` later hands the same loggers to uvicorn's handler and format.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["log_to_stderr"]


class _StderrHandler(logging.StreamHandler):
    pass


def log_to_stderr(level: int = logging.INFO) -> None:
    logger = logging.getLogger("dsv4")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dsv4: %(message)s"))
        logger.addHandler(handler)
