"""The compressor's gated window pooling: out[d] = sum_s kv[s, d] * softmax_s(score[:, d])[s].

One program per (window, block of channels); the slots (4 for HCA-128's 128, 8 for CSA's overlap,
128 for HCA) are one tile, so the softmax needs no second pass. -inf scores (CSA's first window
has no previous one) weigh zero."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.common import supported
from dsv4.model.compressor import window_pool as window_pool_torch

__all__ = ["window_pool"]


@triton.jit
def _window_pool_kernel(kv_ptr, score_ptr, out_ptr, slots, dim, SLOTS: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    win = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, SLOTS)
    mask = (rows[:, None] < slots) & (cols[None, :] < dim)
    offs = win * slots * dim + rows[:, None] * dim + cols[None, :]
    s = tl.load(score_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    s = tl.where(cols[None, :] < dim, s, 0.0)  # no all--inf column past dim (NaN, unused)
    kv = tl.load(kv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    top = tl.max(s, axis=0)
    w = tl.exp(s - top[None, :])
    w = w / tl.sum(w, axis=0)[None, :]
    out = tl.sum(kv * w, axis=0)
    tl.store(out_ptr + win * dim + cols, out.to(out_ptr.dtype.element_ty), mask=cols < dim)


def window_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    if not supported(kv, score) or kv.shape != score.shape:
        return window_pool_torch(kv, score)
    slots, dim = kv.shape[-2:]
    dtype = torch.promote_types(kv.dtype, score.dtype)
    k = kv.reshape(-1, slots, dim).contiguous()
    s = score.reshape(-1, slots, dim).contiguous()
    out = torch.empty(k.shape[0], dim, dtype=dtype, device=kv.device)
    block = min(64, triton.next_power_of_2(dim))
    _window_pool_kernel[(k.shape[0], triton.cdiv(dim, block))](
        k, s, out, slots, dim, SLOTS=triton.next_power_of_2(slots), BLOCK_D=block)
    return out.view(*kv.shape[:-2], dim)
