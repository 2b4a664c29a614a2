"""mHC around a sublayer: hc_pre (RMS-normed mixing weights, Sinkhorn, collapse of the streams)
and hc_post (spread the output over the streams and mix them), one program per token.

hc_pre reads the token's n*d streams twice: once for the mixing logits (x . fn rows and the sum
of squares in the same pass; the RMS factor applies after the dot products, which is exact
algebra but another rounding order than the reference's normalise-then-matmul), once to
collapse them. The n x n Sinkhorn runs in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.common import supported
from dsv4.model.mhc import hc_post as hc_post_torch
from dsv4.model.mhc import hc_pre as hc_pre_torch

__all__ = ["hc_post", "hc_pre"]


@triton.jit
def _hc_pre_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, out_ptr, post_ptr, comb_ptr, width, dim,
                   iters, hc_eps, norm_eps, N: tl.constexpr, NZ: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + tok * width
    z_rows = tl.arange(0, NZ)
    z_mask = z_rows < (2 + N) * N
    acc = tl.zeros([NZ], tl.float32)
    sq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_row + k, mask=k < width, other=0.0).to(tl.float32)
        sq += xk * xk
        f = tl.load(fn_ptr + z_rows[:, None] * width + k[None, :],
                    mask=z_mask[:, None] & (k[None, :] < width), other=0.0)
        acc += tl.sum(f * xk[None, :], axis=1)
    z = acc / tl.sqrt(tl.sum(sq, axis=0) / width + norm_eps)
    base = tl.load(base_ptr + z_rows, mask=z_mask, other=0.0)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    part = tl.where(z_rows < N, s0, tl.where(z_rows < 2 * N, s1, s2))
    mixed = z * part + base  # pre | post | comb logits, by position in z
    # pre / post: the first 2N entries, picked into [N] vectors with a one-hot reduction
    j = tl.arange(0, N)
    pick_pre = (z_rows[None, :] == j[:, None]).to(tl.float32)
    pick_post = (z_rows[None, :] == (j[:, None] + N)).to(tl.float32)
    pre = tl.sigmoid(tl.sum(pick_pre * mixed[None, :], axis=1)) + hc_eps
    post = 2.0 * tl.sigmoid(tl.sum(pick_post * mixed[None, :], axis=1))
    tl.store(post_ptr + tok * N + j, post)
    # comb [src, dst]: entry 2N + src * N + dst of z
    src = tl.arange(0, N)[:, None]
    dst = tl.arange(0, N)[None, :]
    slot = 2 * N + src * N + dst  # [N, N]
    onehot = (slot[:, :, None] == z_rows[None, None, :]).to(tl.float32)
    c = tl.sum(onehot * mixed[None, None, :], axis=2)
    c = tl.exp(c - tl.max(c, axis=1)[:, None])
    c = c / tl.sum(c, axis=1)[:, None]  # softmax over destinations
    c = c + hc_eps
    c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)  # columns
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)  # rows
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)  # columns
    tl.store(comb_ptr + tok * N * N + src * N + dst, c)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = (j[:, None] < N) & (d[None, :] < dim)
        xs = tl.load(x_row + j[:, None] * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
        out = tl.sum(pre[:, None] * xs, axis=0)
        tl.store(out_ptr + tok * dim + d, out.to(out_ptr.dtype.element_ty), mask=d < dim)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, hc_eps: float, norm_eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, dim = x.shape[-2:]
    if not supported(x) or n & (n - 1) or fn.dtype != torch.float32 or iters < 1:
        return hc_pre_torch(x, fn, scale, base, iters, hc_eps, norm_eps)
    lead = x.shape[:-2]
    xs = x.reshape(-1, n * dim).contiguous()
    tokens = xs.shape[0]
    out = torch.empty(tokens, dim, dtype=x.dtype, device=x.device)
    post = torch.empty(tokens, n, dtype=torch.float32, device=x.device)
    comb = torch.empty(tokens, n, n, dtype=torch.float32, device=x.device)
    _hc_pre_kernel[(tokens,)](
        xs, fn.contiguous(), scale.contiguous(), base.contiguous(), out, post, comb, n * dim,
        dim, iters, hc_eps, norm_eps, N=n, NZ=triton.next_power_of_2((2 + n) * n),
        BLOCK_K=min(256, triton.next_power_of_2(n * dim)),
        BLOCK_D=min(128, triton.next_power_of_2(dim)))
    return out.view(*lead, dim), post.view(*lead, n), comb.view(*lead, n, n)


@triton.jit
def _hc_post_kernel(y_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, dim, N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, N)
    dm = d < dim
    m = (j[:, None] < N) & dm[None, :]
    y = tl.load(y_ptr + tok * dim + d, mask=dm, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + tok * N * dim + j[:, None] * dim + d[None, :], mask=m,
                  other=0.0).to(tl.float32)  # [src, D]
    post = tl.load(post_ptr + tok * N + j).to(tl.float32)
    comb = tl.load(comb_ptr + tok * N * N + j[:, None] * N + j[None, :]).to(tl.float32)
    mix = tl.sum(comb[:, :, None] * res[:, None, :], axis=0)  # [dst, D]: sum over sources
    out = post[:, None] * y[None, :] + mix
    tl.store(out_ptr + tok * N * dim + j[:, None] * dim + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m)


def hc_post(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    n, dim = residual.shape[-2:]
    if not supported(y, residual) or n & (n - 1):
        return hc_post_torch(y, residual, post, comb)
    res = residual.reshape(-1, n, dim).contiguous()
    out = torch.empty_like(res)
    block = min(128, triton.next_power_of_2(dim))
    _hc_post_kernel[(res.shape[0], triton.cdiv(dim, block))](
        y.reshape(-1, dim).contiguous(), res, post.reshape(-1, n).contiguous(),
        comb.reshape(-1, n, n).contiguous(), out, dim, N=n, BLOCK_D=block)
    return out.view(residual.shape)
