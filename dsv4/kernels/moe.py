"""FP4-expert grouped MoE: every (token, pick) pair of the step in two launches, the experts'
weights read as stored (e2m1 packed two per byte, one ue8m0 scale per 32 inputs).

The pairs are sorted by expert (torch: argsort, bincount, cumsum; no host sync), and each program
takes a tile of one expert's pairs: launch 1 computes h = weight * silu(min(x W1^T, limit)) *
clamp(x W3^T, -limit, limit) for a block of the intermediate width, launch 2 computes h W2^T; the
rows are added into their tokens with index_add_. Expert weights are found through tables of
data pointers indexed by global expert id (built once per expert set and kept); experts this
rank does not hold are skipped, as in the torch loop. FP8 experts (the -Base checkpoints) and
anything else use the torch code.

Under the interpreter the dots run in fp32 (its bf16 tl.dot is broken); on a GPU in x's dtype
with fp32 accumulation (e2m1 x 2^k weights are exact in bf16).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from torch import nn

from dsv4.kernels.common import interpreting, supported
from dsv4.kernels.fp8 import e2m1_value, ue8m0_value
from dsv4.model.moe import routed_experts as routed_experts_torch

__all__ = ["routed_experts"]

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BLOCK_M = 16


@triton.jit
def _fp4_tile(w_tab, s_tab, e, rows, cols, n_rows, K):
    """Expert e's [rows, cols] tile of a packed FP4 weight [n_rows, K/2] with scales [n_rows,
    K/32], as fp32."""
    w_ptr = tl.load(w_tab + e).to(tl.pointer_type(tl.uint8))
    s_ptr = tl.load(s_tab + e).to(tl.pointer_type(tl.uint8))
    m = (rows[:, None] < n_rows) & (cols[None, :] < K)
    r = rows[:, None].to(tl.int64)
    byte = tl.load(w_ptr + r * (K // 2) + cols[None, :] // 2, mask=m, other=0).to(tl.int32)
    code = tl.where((cols[None, :] % 2) == 0, byte & 0xF, byte >> 4)
    sc = tl.load(s_ptr + r * (K // 32) + cols[None, :] // 32, mask=m, other=127).to(tl.int32)
    return e2m1_value(code) * ue8m0_value(sc)


@triton.jit
def _tile(tile_e, tile_start, seg_end, BLOCK_M: tl.constexpr):
    """This program's tile: (expert id, -1 for a spare tile; its sorted pair rows; which rows
    belong to the expert)."""
    tile = tl.program_id(0)
    e = tl.load(tile_e + tile)
    rows = tl.load(tile_start + tile) + tl.arange(0, BLOCK_M)
    return e, rows, rows < tl.load(seg_end + tl.maximum(e, 0))


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr):
    if EMULATE:
        return tl.dot(a.to(tl.float32), tl.trans(b), input_precision="ieee")
    return tl.dot(a, tl.trans(b.to(a.dtype)))


@triton.jit
def _gate_up_kernel(x_ptr, pair_tok, pair_w, tile_e, tile_start, seg_end, w1_tab, s1_tab,
                    w3_tab, s3_tab, h_ptr, DIM, INTER, limit, K_PICKS: tl.constexpr,
                    EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    e, rows, rmask = _tile(tile_e, tile_start, seg_end, BLOCK_M)
    if e < 0:
        return
    tok = tl.load(pair_tok + rows, mask=rmask, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tok[:, None] * DIM + k[None, :],
                    mask=rmask[:, None] & (k[None, :] < DIM), other=0.0)
        g += _dot(x, _fp4_tile(w1_tab, s1_tab, e, n, k, INTER, DIM), EMULATE)
        u += _dot(x, _fp4_tile(w3_tab, s3_tab, e, n, k, INTER, DIM), EMULATE)
    if limit > 0:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    w = tl.load(pair_w + rows, mask=rmask, other=0.0)
    h = w[:, None] * (g * tl.sigmoid(g) * u)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * INTER + n[None, :],
             h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & (n[None, :] < INTER))


@triton.jit
def _down_kernel(h_ptr, tile_e, tile_start, seg_end, w2_tab, s2_tab, out_ptr, DIM, INTER,
                 EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    e, rows, rmask = _tile(tile_e, tile_start, seg_end, BLOCK_M)
    if e < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * INTER + k[None, :],
                    mask=rmask[:, None] & (k[None, :] < INTER), other=0.0)
        acc += _dot(h, _fp4_tile(w2_tab, s2_tab, e, n, k, DIM, INTER), EMULATE)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * DIM + n[None, :], acc,
             mask=rmask[:, None] & (n[None, :] < DIM))


def _tables(experts: nn.ModuleDict, n_experts: int, device: torch.device):
    """Data-pointer tables [n_experts] of (w1, s1, w3, s3, w2, s2) and which experts are held;
    None when some held expert is not FP4 (or the expert set has changed shape)."""
    first = next(iter(experts.values()), None)
    cached = _TABLES.get(experts)
    if cached is not None and first is not None and cached[0] == first.w1.weight.data_ptr():
        return cached[1]
    ptrs = torch.zeros(6, n_experts, dtype=torch.int64)
    held = torch.zeros(n_experts, dtype=torch.bool)
    limit = None
    for key, ex in experts.items():
        lins = (ex.w1, ex.w3, ex.w2)
        if any(lin.fmt != "fp4" or lin.weight.device != device for lin in lins):
            return None
        if limit is not None and ex.limit != limit:
            return None
        limit = ex.limit
        e = int(key)
        for i, lin in enumerate(lins):
            ptrs[2 * i, e] = lin.weight.data_ptr()
            ptrs[2 * i + 1, e] = lin.scale.data_ptr()
        held[e] = True
    if limit is None:
        return None
    ptrs = ptrs.to(device)
    out = (ptrs, held.to(device), limit, first.w1.in_features, first.w1.out_features)
    _TABLES[experts] = (first.w1.weight.data_ptr(), out)
    return out


def routed_experts(experts: nn.ModuleDict, n_experts: int, x: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    tables = _tables(experts, n_experts, x.device) if supported(x) else None
    if tables is None or x.dim() != 2:
        return routed_experts_torch(experts, n_experts, x, weights, ids)
    ptrs, held, limit, dim, inter = tables
    n, k = ids.shape
    flat = ids.reshape(-1)
    # pairs of experts held elsewhere go to a "no expert" bucket past the last id
    eid = torch.where(held[flat], flat, n_experts)
    order = torch.argsort(eid, stable=True)
    counts = torch.bincount(eid, minlength=n_experts + 1)[:n_experts]
    seg_end = torch.cumsum(counts, 0)
    seg_start = seg_end - counts
    tiles_per = (counts + _BLOCK_M - 1) // _BLOCK_M
    tile_cum = torch.cumsum(tiles_per, 0)
    bound = (n * k) // _BLOCK_M + min(n_experts, n * k)  # tiles can never exceed this
    t = torch.arange(bound, device=x.device)
    tile_e = torch.searchsorted(tile_cum, t, right=True)
    valid = tile_e < n_experts
    te = tile_e.clamp_max(n_experts - 1)
    tile_start = seg_start[te] + (t - (tile_cum[te] - tiles_per[te])) * _BLOCK_M
    tile_e = torch.where(valid, te, -1).to(torch.int32).contiguous()
    tile_start = tile_start.to(torch.int32).contiguous()
    pair_tok = (order // k).to(torch.int32).contiguous()
    pair_w = weights.reshape(-1).float()[order].contiguous()
    xc = x.contiguous()
    h = torch.empty(n * k, inter, dtype=x.dtype, device=x.device)
    # zeros: rows of pairs whose expert is held elsewhere are never written, and add nothing
    out = torch.zeros(n * k, dim, dtype=torch.float32, device=x.device)
    emulate = interpreting()
    block_n, block_k = 64, 64
    _gate_up_kernel[(bound, triton.cdiv(inter, block_n))](
        xc, pair_tok, pair_w, tile_e, tile_start, seg_end, ptrs[0], ptrs[1], ptrs[2], ptrs[3],
        h, dim, inter, float(limit), K_PICKS=k, EMULATE=emulate, BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n, BLOCK_K=block_k)
    _down_kernel[(bound, triton.cdiv(dim, block_n))](
        h, tile_e, tile_start, seg_end, ptrs[4], ptrs[5], out, dim, inter, EMULATE=emulate,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32),
                    device=x.device)
    return y.index_add_(0, pair_tok.long(), out)
