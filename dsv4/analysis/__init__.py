"""Efficiency analysis of DeepSeek-V4 (``dsv4 analyze``, GitHub issue 5).

Analytic per-token decode FLOPs (``flops``) and KV-cache bytes (``kv``) for V4-Flash, V4-Pro
and the MLA baselines V3 / V3.2 (``baselines``), their comparison with DeepSeek's published
claims (``report``, ``text``, ``plot``), and a meta-device FLOP count of dsv4's real model code
that checks the analytic model (``measure``). The CLI entry point is ``dsv4.analysis.cli.main``.
"""

from __future__ import annotations

from dsv4.analysis.baselines import BASELINES, MLAConfig
from dsv4.analysis.flops import flops_per_token
from dsv4.analysis.kv import kv_bytes_per_sequence, kv_bytes_per_token
from dsv4.analysis.report import analyze, claim_checks

__all__ = [
           "BASELINES",
           "MLAConfig",
           "analyze",
           "claim_checks",
           "flops_per_token",
           "kv_bytes_per_sequence",
           "kv_bytes_per_token",
]
