"""benchmarks/gpu_check.py: its --dry-run (the tiny config through the interpreted kernels on the
CPU) runs and prints the table; without a GPU the real check refuses with a clear message."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run interprets the kernels on "
                    "the CPU; with a GPU they are compiled (gpu_check runs the real thing)")
def test_kernel_gpu_check_dry_run_prints_every_layer_kind(capsys):
    pytest.importorskip("triton")
    from dsv4.ops import configure

    try:
        assert _load().main(["--dry-run", "--batches", "1", "--steps", "1"]) == 0
    finally:
        configure("cpu", "")
    out = capsys.readouterr().out
    for kind in ("swa", "csa", "hca"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"| {kind} | 1 |"))
        assert "skip" not in line and "| n/a |" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_kernel_gpu_check_without_gpu_says_so(capsys):
    assert _load().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
