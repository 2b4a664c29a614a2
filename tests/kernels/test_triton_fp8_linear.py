"""Block-scaled FP8 linear: the Triton GEMM vs dequantize-then-matmul (fp32, interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.fp8_linear import fp8_linear
from dsv4.model.linear import fp8_linear as linear_torch
from dsv4.quant import quant_fp8_blocks


@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 130, 200), (5, 64, 256), (17, 200, 136)])
def test_triton_fp8_linear_matches_dequant_matmul(kernel_device, ue8m0, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n)[:, None]  # blocks differ
    weight, scale = quant_fp8_blocks(w, ue8m0=ue8m0)
    weight, scale = weight.to(kernel_device), scale.to(kernel_device)
    x = torch.randn(2, m, k, generator=g).to(kernel_device)  # [B, T, in]: ragged rows over the tile
    got = fp8_linear(x, weight, scale)
    # exact products, fp32 sums per 64-wide tile, scaled per block: another order than one
    # dense matmul
    torch.testing.assert_close(got, linear_torch(x, weight, scale), rtol=1e-5, atol=1e-4)
    assert got.shape == (2, m, n)
