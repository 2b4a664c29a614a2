"""Sparse attention with a sink over dsv4's key sources, one pass with an online softmax.

Takes what dsv4.model.attention.sparse_attention takes: queries [B, T, H, D] and one or two
sources (the window; the compressed entries), each Shared (keys [B, K, D] every query of the row
may see, with a visibility mask) or Gathered (slots per query into the cache storage: CSA's
top-k, and on the batched decode path the window and all compressed entries too). A Gathered
source is read in place from the cache storage, as plain vectors (fp32 / bf16) or as the
584-byte fp8 entry (e4m3 nope dims with ue8m0 scales per 64, bf16 rope dims) decoded in the
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
def _attend_source(q, m, l, acc, b, t, ptr, sb, sk, vis_ptr, vb, vt, vk, K, cols, scale,
                   KIND: tl.constexpr, FMT: tl.constexpr, NOPE: tl.constexpr,
                   ROPE: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_BF16: tl.constexpr):
    """All keys of one source into the running softmax. KIND 1 (Shared): keys [B, K, D] with
    visibility [B or 1, T, K]; KIND 2 (Gathered): slots [B or 1, T, K] (-1: none) into storage
    [B or 1, L, D or bytes], plain or fp8 entries (FMT)."""
    dmask = cols[None, :] < D
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if KIND == 1:
            vis = tl.load(vis_ptr + b * vb + t * vt + k * vk, mask=k < K, other=0) != 0
            keys = tl.load(ptr + b * sb + k[:, None] * sk + cols[None, :],
                           mask=vis[:, None] & dmask, other=0.0).to(tl.float32)
        else:
            slot = tl.load(vis_ptr + b * vb + t * vt + k * vk, mask=k < K, other=-1)
            vis = slot >= 0
            row = ptr + b * sb + tl.maximum(slot, 0) * sk
            if FMT == 1:
                keys = _fp8_keys(row, vis, cols, NOPE, ROPE)
            else:
                keys = tl.load(row[:, None] + cols[None, :], mask=vis[:, None] & dmask,
                               other=0.0).to(tl.float32)
        m, l, acc = _update(q, keys, vis, m, l, acc, scale, DOT_BF16)
    return m, l, acc


@triton.jit
def _sparse_attention_kernel(
        q_ptr, sink_ptr, out_ptr, T, H, scale,
        a_ptr, a_sb, a_sk, a_vis, a_vb, a_vt, a_vk, KA,
        b_ptr, b_sb, b_sk, b_vis, b_vb, b_vt, b_vk, KB,
        A_KIND: tl.constexpr, A_FMT: tl.constexpr, B_KIND: tl.constexpr,
        B_FMT: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr,
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
    m, l, acc = _attend_source(q, m, l, acc, b, t, a_ptr, a_sb, a_sk, a_vis, a_vb, a_vt, a_vk,
                               KA, cols, scale, A_KIND, A_FMT, NOPE, ROPE, D, BLOCK_K,
                               DOT_BF16)
    if B_KIND != 0:
        m, l, acc = _attend_source(q, m, l, acc, b, t, b_ptr, b_sb, b_sk, b_vis, b_vb, b_vt,
                                   b_vk, KB, cols, scale, B_KIND, B_FMT, NOPE, ROPE, D,
                                   BLOCK_K, DOT_BF16)
    out = acc / l[:, None]
    tl.store(out_ptr + (bt * H + heads[:, None]) * D + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask)


def _gathered_format(src: Gathered, dim: int) -> tuple[int, int] | None:
    """(_PLAIN or _FP8, rope dims) of a gathered source, or None for a storage the kernel
    cannot read."""
    if src.decode is None:
        ok = src.kv.shape[-1] == dim and src.kv.dtype in (torch.float32, torch.bfloat16)
        return (_PLAIN, 0) if ok else None
    fmt = getattr(getattr(src.decode, "func", None), "__self__", None)
    if isinstance(fmt, EntryFormat) and fmt.kind == "fp8_main" and fmt.dim == dim:
        return _FP8, fmt.rope_dim
    return None


def _source_args(src: Gathered | Shared, dim: int) -> tuple[tuple, int, int, int] | None:
    """(kernel arguments, kind, format, rope dims) of one source; None if it cannot be read."""
    if isinstance(src, Shared):
        if src.keys.dtype not in (torch.float32, torch.bfloat16):
            return None
        keys = src.keys if src.keys.stride(-1) == 1 else src.keys.contiguous()
        vis = src.visible.view(torch.uint8)
        return ((keys, 0 if keys.shape[0] == 1 else keys.stride(0), keys.stride(1), vis,
                 0 if vis.shape[0] == 1 else vis.stride(0), vis.stride(1), vis.stride(2),
                 keys.shape[1]), 1, _PLAIN, 0)
    fmt = _gathered_format(src, dim)
    if fmt is None:
        return None
    store = src.kv if src.kv.stride(-1) == 1 else src.kv.contiguous()
    idx = src.idx
    return ((store, 0 if store.shape[0] == 1 else store.stride(0), store.stride(1), idx,
             0 if idx.shape[0] == 1 else idx.stride(0), idx.stride(1), idx.stride(2),
             idx.shape[2]), 2, *fmt)


def sparse_attention(q: torch.Tensor, sources: list[Gathered | Shared], sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    bsz, t, h, d = q.shape
    parsed = ([_source_args(s, d) for s in sources]
              if supported(q) and len(sources) in (1, 2) and d <= 1024 else [None])
    ropes = {p[3] for p in parsed if p is not None and p[2] == _FP8}
    if any(p is None for p in parsed) or len(ropes) > 1:
        return sparse_attention_torch(q, sources, sink, scale)
    qc = q.contiguous()
    out = torch.empty_like(qc)
    rope = ropes.pop() if ropes else 0
    a = parsed[0]
    b = parsed[1] if len(parsed) == 2 else ((qc, 0, 0, qc, 0, 0, 0, 0), 0, _PLAIN, 0)
    block_h = 16  # tl.dot's smallest tile; fewer heads are masked
    _sparse_attention_kernel[(bsz * t, triton.cdiv(h, block_h))](
        qc, sink.float().contiguous(), out, t, h, scale, *a[0], *b[0], A_KIND=a[1],
        A_FMT=a[2], B_KIND=b[1], B_FMT=b[2], NOPE=d - rope, ROPE=rope, D=d,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_H=block_h, BLOCK_K=16,
        DOT_BF16=q.dtype == torch.bfloat16 and not interpreting())
    return out
