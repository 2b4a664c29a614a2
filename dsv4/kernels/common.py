"""What every kernel wrapper shares: when to hand an input back to the torch reference."""

from __future__ import annotations

import torch

from dsv4 import env

# dtypes the kernels take; fp64 (dsv4's exact mode) always runs the torch reference
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Running in Triton's CPU interpreter (tests), where some GPU paths are replaced."""
    return env.triton_interpret()


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: kernel dtypes, on CUDA or interpreted, and
    not empty (an empty launch grid is skipped by the reference for free)."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES or t.numel() == 0:
            return False
        if t.device.type != "cuda" and not interpreting():
            return False
    return True
