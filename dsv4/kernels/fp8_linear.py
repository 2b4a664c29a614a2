"""Block-scaled FP8 linear: y = x @ (W * s)^T with W e4m3 [N, K] kept as stored and one scale
per 128 x 128 block (ue8m0 bytes or fp32), applied to each block's partial dot product.

Tiles of BLOCK_K <= 128 dividing 128 stay inside one scale block, so a tile's product is scaled
once. On a GPU the weight bytes are cast by the hardware (e4m3 -> bf16, exact) and the dot runs
in bf16 with fp32 accumulation; under the interpreter (its fp8 casts and bf16 dots are broken)
the bytes are decoded with bit operations and the dot runs in fp32. Scales come in as uint8
bytes, not float8_e8m0fnu, which the interpreter cannot take.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.common import interpreting, supported
from dsv4.kernels.fp8 import e4m3_value, ue8m0_value
from dsv4.model.linear import fp8_linear as fp8_linear_torch

__all__ = ["fp8_linear"]


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, s_cols,
                       SCALE_U8: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xm = (rm[:, None] < M) & (rk[None, :] < K)
        wm = (rn[:, None] < N) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=xm, other=0.0)
        wb = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=wm, other=0)
        if EMULATE:
            w = e4m3_value(wb.to(tl.int32))
            part = tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            w = wb.to(tl.float8e4nv, bitcast=True).to(x.dtype)
            part = tl.dot(x, tl.trans(w))
        # one scale per 128 x 128 block: BLOCK_N and BLOCK_K divide 128, so a tile is in one
        sidx = (pid_n * BLOCK_N // 128) * s_cols + k0 // 128
        if SCALE_U8:
            s = ue8m0_value(tl.load(s_ptr + sidx).to(tl.int32))
        else:
            s = tl.load(s_ptr + sidx)
        acc += part * s
    tl.store(out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if not supported(x) or weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        return fp8_linear_torch(x, weight, scale)
    n, k = weight.shape
    xs = x.reshape(-1, k).contiguous()
    m = xs.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    u8 = scale.dtype in (torch.float8_e8m0fnu, torch.uint8)
    s = scale.view(torch.uint8) if u8 else scale.float()
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _fp8_linear_kernel[grid](xs, weight.view(torch.uint8), s.contiguous(), out, m, n, k,
                             s.shape[1], SCALE_U8=u8, EMULATE=interpreting(),
                             BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
    return out.view(*x.shape[:-1], n)
