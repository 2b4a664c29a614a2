"""Sparse attention with a sink over dsv4's key sources, one pass with an online softmax.

Takes what dsv4.model.attention.sparse_attention takes: queries [B, T, H, D] and a list of
sources, the first a Shared (keys [B, K, D] every query of the row may see, with a visibility
mask: the sliding window) and optionally a second one, Shared (HCA's, or CSA's below top-k,
compressed entries) or Gathered (CSA's top-k: entry slots per query into the cache storage).
A Gathered source is read in place from the cache storage, as plain vectors (fp32 / bf16) or as
the 584-byte fp8 entry (e4m3 nope dims with ue8m0 scales per 64, bf16 rope dims) decoded in the
kernel: no gathered or decoded copy is made. K = V: each key tile is read once for the logits and
the output. The sink starts the running max and denominator (a logit with no value).

One program per (query, block of heads). Under the interpreter every dot runs in fp32 (its bf16
tl.dot returns garbage); on a GPU bf16 queries use bf16 dots with fp32 accumulation, as the
peers' kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.cache.kv_format import EntryFormat
from dsv4.kernels.common import interpreting, supported
from dsv4.kernels.fp8 import bf16_value, e4m3_value, ue8m0_value
from dsv4.model.attention import Gathered, Shared
from dsv4.model.attention import sparse_attention as sparse_attention_torch

__all__ = ["sparse_attention"]

_PLAIN, _FP8 = 0, 1  # how a gathered source stores its keys


@triton.jit
def _fp8_keys(row_ptr, valid, cols, NOPE: tl.constexpr, ROPE: tl.constexpr):
    """Decode [BK] fp8 entries (row_ptr [BK] byte pointers) into [BK, D] fp32 keys."""
    nope = cols[None, :] < NOPE
    m = valid[:, None] & nope
    code = tl.load(row_ptr[:, None] + cols[None, :], mask=m, other=0).to(tl.int32)
    sc = tl.load(row_ptr[:, None] + NOPE + 2 * ROPE + cols[None, :] // 64, mask=m,
                 other=127).to(tl.int32)
    r = cols[None, :] - NOPE
    mr = valid[:, None] & (r >= 0)
    lo = tl.load(row_ptr[:, None] + NOPE + 2 * r, mask=mr, other=0).to(tl.int32)
    hi = tl.load(row_ptr[:, None] + NOPE + 2 * r + 1, mask=mr, other=0).to(tl.int32)
    return tl.where(nope, e4m3_value(code) * ue8m0_value(sc), bf16_value(lo | (hi << 8)))


@triton.jit
def _update(q, keys, valid, m, l, acc, scale, DOT_BF16: tl.constexpr):
    """One key tile into the running (max m [BH], sum l [BH], acc [BH, D])."""
    if DOT_BF16:
        s = tl.dot(q.to(tl.bfloat16), tl.trans(keys.to(tl.bfloat16)))
    else:
        s = tl.dot(q, tl.trans(keys), input_precision="ieee")
    s = tl.where(valid[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # m starts at the sink: finite
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if DOT_BF16:
        pv = tl.dot(p.to(tl.bfloat16), keys.to(tl.bfloat16))
    else:
        pv = tl.dot(p, keys, input_precision="ieee")
    return m_new, l, acc * alpha[:, None] + pv


@triton.jit
def _sparse_attention_kernel(
        q_ptr, sink_ptr, out_ptr, T, H, scale,
        a_ptr, a_sb, a_sk, a_vis, a_vb, a_vt, a_vk, KA,
        b_ptr, b_sb, b_sk, b_vis, b_vb, b_vt, b_vk, KB,
        B_KIND: tl.constexpr, B_FMT: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_BF16: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    hmask = heads < H
    qmask = hmask[:, None] & (cols[None, :] < D)
    q = tl.load(q_ptr + (bt * H + heads[:, None]) * D + cols[None, :], mask=qmask,
                other=0.0).to(tl.float32)
    m = tl.load(sink_ptr + heads, mask=hmask, other=0.0).to(tl.float32)
    l = tl.full([BLOCK_H], 1.0, tl.float32)  # exp(sink - sink)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    dmask = cols[None, :] < D
    # source A: shared keys [B, KA, D] with visibility [B or 1, T, KA]
    for k0 in range(0, KA, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        vis = tl.load(a_vis + b * a_vb + t * a_vt + k * a_vk, mask=k < KA, other=0) != 0
        keys = tl.load(a_ptr + b * a_sb + k[:, None] * a_sk + cols[None, :],
                       mask=vis[:, None] & dmask, other=0.0).to(tl.float32)
        m, l, acc = _update(q, keys, vis, m, l, acc, scale, DOT_BF16)
    if B_KIND == 1:  # shared, as A
        for k0 in range(0, KB, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            vis = tl.load(b_vis + b * b_vb + t * b_vt + k * b_vk, mask=k < KB, other=0) != 0
            keys = tl.load(b_ptr + b * b_sb + k[:, None] * b_sk + cols[None, :],
                           mask=vis[:, None] & dmask, other=0.0).to(tl.float32)
            m, l, acc = _update(q, keys, vis, m, l, acc, scale, DOT_BF16)
    if B_KIND == 2:  # gathered: slots [B or 1, T, KB] (-1: none) into storage [B or 1, L, W]
        for k0 in range(0, KB, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            slot = tl.load(b_vis + b * b_vb + t * b_vt + k * b_vk, mask=k < KB, other=-1)
            vis = slot >= 0
            row = b_ptr + b * b_sb + tl.maximum(slot, 0) * b_sk
            if B_FMT == 1:
                keys = _fp8_keys(row, vis, cols, NOPE, ROPE)
            else:
                keys = tl.load(row[:, None] + cols[None, :], mask=vis[:, None] & dmask,
                               other=0.0).to(tl.float32)
            m, l, acc = _update(q, keys, vis, m, l, acc, scale, DOT_BF16)
    out = acc / l[:, None]
    tl.store(out_ptr + (bt * H + heads[:, None]) * D + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask)


def _gathered_format(src: Gathered, dim: int) -> int | None:
    """_PLAIN, _FP8, or None for a storage the kernel cannot read."""
    if src.decode is None:
        return _PLAIN if src.kv.shape[-1] == dim and src.kv.dtype.is_floating_point else None
    fmt = getattr(getattr(src.decode, "func", None), "__self__", None)
    if isinstance(fmt, EntryFormat) and fmt.kind == "fp8_main" and fmt.dim == dim:
        return _FP8
    return None


def _shared_args(src: Shared, b: int) -> tuple:
    keys = src.keys if src.keys.stride(-1) == 1 else src.keys.contiguous()
    vis = src.visible.view(torch.uint8)
    vb = 0 if vis.shape[0] == 1 else vis.stride(0)
    return (keys, 0 if keys.shape[0] == 1 else keys.stride(0), keys.stride(1), vis, vb,
            vis.stride(1), vis.stride(2), keys.shape[1])


def sparse_attention(q: torch.Tensor, sources: list[Gathered | Shared], sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    bsz, t, h, d = q.shape
    kinds = [type(s) for s in sources]
    ok = supported(q) and len(sources) in (1, 2) and kinds[0] is Shared and d <= 1024
    fmt = None
    if ok and len(sources) == 2 and kinds[1] is Gathered:
        fmt = _gathered_format(sources[1], d)
        ok = fmt is not None
    if ok and any(s.keys.dtype not in (torch.float32, torch.bfloat16)
                  for s in sources if isinstance(s, Shared)):
        ok = False
    if not ok:
        return sparse_attention_torch(q, sources, sink, scale)
    qc = q.contiguous()
    out = torch.empty_like(qc)
    a = _shared_args(sources[0], bsz)
    b_kind, nope, rope = 0, d, 0
    b = (qc, 0, 0, qc, 0, 0, 0, 0)  # unused pointers when there is no second source
    if len(sources) == 2 and isinstance(sources[1], Shared):
        b_kind, b = 1, _shared_args(sources[1], bsz)
    elif len(sources) == 2:
        src = sources[1]
        store = src.kv if src.kv.stride(-1) == 1 else src.kv.contiguous()
        idx = src.idx
        b_kind = 2
        b = (store, 0 if store.shape[0] == 1 else store.stride(0), store.stride(1), idx,
             0 if idx.shape[0] == 1 else idx.stride(0), idx.stride(1), idx.stride(2),
             idx.shape[2])
        if fmt == _FP8:
            rope = src.decode.func.__self__.rope_dim
            nope = d - rope
    block_h = 16  # tl.dot's smallest tile; fewer heads are masked
    _sparse_attention_kernel[(bsz * t, triton.cdiv(h, block_h))](
        qc, sink.float().contiguous(), out, t, h, scale, *a, *b, B_KIND=b_kind,
        B_FMT=fmt or 0, NOPE=nope, ROPE=rope, D=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_H=block_h, BLOCK_K=16,
        DOT_BF16=q.dtype == torch.bfloat16 and not interpreting())
    return out
