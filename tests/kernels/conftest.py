"""Kernel tests: Triton kernels against dsv4's torch implementations.

Without a CUDA device they run in Triton's CPU interpreter: TRITON_INTERPRET must be set before
any kernel is decorated (triton reads it in @triton.jit), so it is set here, when pytest imports
this conftest, before the test modules (and through them dsv4.kernels) are imported. With a GPU
(benchmarks/gpu_check.py) they run compiled on it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
