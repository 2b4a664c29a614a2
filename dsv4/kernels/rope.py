"""Interleaved partial RoPE: the trailing 2*half dims rotate as (even, odd) pairs, the leading
dims are copied; one program per row of x. cos/sin broadcast to x[..., 0::2] as in the reference
and are read through their (possibly zero) strides, never expanded in memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.common import supported
from dsv4.model.layers import apply_rope as apply_rope_torch

__all__ = ["apply_rope"]

_LEAD = 4  # leading dims the kernel indexes (x is viewed as [s0, s1, s2, s3, dim])


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, dim, s1, s2, s3, c0, c1, c2, c3,
                 SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i3 = row % s3
    rest = row // s3
    i2 = rest % s2
    rest = rest // s2
    i1 = rest % s1
    i0 = rest // s1
    cs = i0 * c0 + i1 * c1 + i2 * c2 + i3 * c3
    base = row * dim
    nope = dim - 2 * HALF
    cols = tl.arange(0, BLOCK)
    keep = cols < nope
    v = tl.load(x_ptr + base + cols, mask=keep)
    tl.store(out_ptr + base + cols, v, mask=keep)
    pairs = tl.arange(0, HALF)
    even = tl.load(x_ptr + base + nope + 2 * pairs).to(tl.float32)
    odd = tl.load(x_ptr + base + nope + 2 * pairs + 1).to(tl.float32)
    c = tl.load(cos_ptr + cs + pairs)
    s = tl.load(sin_ptr + cs + pairs) * SIGN
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + nope + 2 * pairs, (even * c - odd * s).to(ty))
    tl.store(out_ptr + base + nope + 2 * pairs + 1, (even * s + odd * c).to(ty))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    half = cos.shape[-1]
    lead = x.shape[:-1]
    if (not supported(x) or cos.dtype != torch.float32 or len(lead) > _LEAD
            or half & (half - 1)):
        return apply_rope_torch(x, cos, sin, inverse)
    try:
        c = cos.expand(*lead, half)
        s = sin.expand(*lead, half)
    except RuntimeError:  # cos broadcasts the other way: leave it to the reference
        return apply_rope_torch(x, cos, sin, inverse)
    if c.stride() != s.stride() or c.stride(-1) != 1:
        c, s = c.contiguous(), s.contiguous()
    dim = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    pad = _LEAD - len(lead)
    sizes = (1,) * pad + tuple(lead)
    strides = (0,) * pad + c.stride()[:-1]
    _rope_kernel[(xc.numel() // dim,)](
        xc, c, s, out, dim, sizes[1], sizes[2], sizes[3], *strides,
        SIGN=-1.0 if inverse else 1.0, HALF=half, BLOCK=triton.next_power_of_2(dim))
    return out
