"""The lightning indexer: scores over compressed keys (plain or FP4 entries read in place) and
the deterministic top-k.

scores[b, t, e] = sum_h w[b, t, h] * ReLU(q[b, t, h] . K[e]); one program per (query, block of
entries), all heads at once. FP4 keys are kv_format's "fp4_key" entries (e2m1 codes two per
byte, low nibble first, then one ue8m0 scale per 32 dims), decoded in the kernel.

Top-k: higher score first, ties to the lower entry id, -1 past the visible entries (as
dsv4.model.indexer.select_topk). Each row's (score, id) pairs are packed into one int64 key that
orders exactly that way (the score's fp32 bits made monotone, then the complement of the id), and
the row is sorted in registers: rows of up to 4096 entries; longer rows use the torch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.cache.kv_format import EntryFormat
from dsv4.kernels.common import interpreting, supported
from dsv4.kernels.fp8 import e2m1_value, ue8m0_value
from dsv4.model.indexer import KeySlots
from dsv4.model.indexer import indexer_scores as indexer_scores_torch
from dsv4.model.indexer import select_topk as select_topk_torch

__all__ = ["indexer_scores", "indexer_scores_paged", "select_topk"]

_MAX_TOPK_ROW = 4096
_ID_BITS = 20  # entry ids below 2^20 (a 4M-token context at ratio 4)


@triton.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, k_sb, k_se, slot_ptr, s_sb, out_ptr, T, E, H,
                   FP4: tl.constexpr, SLOTS: tl.constexpr, D: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, DOT_BF16: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, D)
    hmask = heads < H
    q = tl.load(q_ptr + (bt * H + heads[:, None]) * D + cols[None, :], mask=hmask[:, None],
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + bt * H + heads, mask=hmask, other=0.0).to(tl.float32)
    emask = e < E
    row = e
    if SLOTS:
        row = tl.load(slot_ptr + b * s_sb + e, mask=emask, other=0)
        emask = emask & (row >= 0)
        row = tl.maximum(row, 0)
    base = k_ptr + b * k_sb + row.to(tl.int64) * k_se
    if FP4:
        byte = tl.load(base[:, None] + cols[None, :] // 2, mask=emask[:, None], other=0)
        code = tl.where((cols[None, :] % 2) == 0, byte & 0xF, byte >> 4).to(tl.int32)
        sc = tl.load(base[:, None] + D // 2 + cols[None, :] // 32, mask=emask[:, None],
                     other=127).to(tl.int32)
        keys = e2m1_value(code) * ue8m0_value(sc)
    else:
        keys = tl.load(base[:, None] + cols[None, :], mask=emask[:, None], other=0.0)
        keys = keys.to(tl.float32)
    if DOT_BF16:
        logits = tl.dot(q.to(tl.bfloat16), tl.trans(keys.to(tl.bfloat16)))
    else:
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee")
    scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
    tl.store(out_ptr + bt * E + e, scores, mask=e < E)


def _launch(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
            slots: torch.Tensor | None, fp4: bool, n_entries: int) -> torch.Tensor:
    bsz, t, h, d = q.shape
    qc, wc = q.contiguous(), weights.float().contiguous()
    out = torch.empty(bsz, t, n_entries, dtype=torch.float32, device=q.device)
    kc = keys if keys.stride(-1) == 1 else keys.contiguous()
    k_sb = 0 if kc.shape[0] == 1 else kc.stride(0)
    s = slots if slots is not None else kc
    s_sb = 0 if slots is None or slots.shape[0] == 1 else slots.stride(0)
    block_e = 16
    _scores_kernel[(bsz * t, triton.cdiv(n_entries, block_e))](
        qc, wc, kc, k_sb, kc.stride(1), s, s_sb, out, t, n_entries, h, FP4=fp4,
        SLOTS=slots is not None, D=d, BLOCK_H=max(16, triton.next_power_of_2(h)),
        BLOCK_E=block_e, DOT_BF16=q.dtype == torch.bfloat16 and not interpreting())
    return out


def indexer_scores(q: torch.Tensor, keys: torch.Tensor | KeySlots,
                   weights: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], keys [B, E, D] (vectors) or KeySlots (read in place), weights [B, T, H]
    -> [B, T, E] fp32."""
    if isinstance(keys, KeySlots):
        fmt = (getattr(getattr(keys.decode, "func", None), "__self__", None)
               if keys.decode is not None else None)
        if keys.decode is not None and not isinstance(fmt, EntryFormat):
            raise ValueError("indexer keys: a decoder the kernel cannot read")
        fmt = fmt or EntryFormat("plain", q.shape[-1], 0, keys.storage.dtype)
        return indexer_scores_paged(q, keys.storage, keys.slots, weights, fmt)
    d = q.shape[-1]
    if (not supported(q, keys) or d & (d - 1) or d < 16 or q.shape[2] > 128
            or q.dtype == torch.float64):
        return indexer_scores_torch(q, keys, weights)
    return _launch(q, weights, keys, None, False, keys.shape[1])


def indexer_scores_paged(q: torch.Tensor, storage: torch.Tensor, slots: torch.Tensor,
                         weights: torch.Tensor, fmt: EntryFormat) -> torch.Tensor:
    """Scores over keys read in place: storage [B or 1, S, nbytes or D], slots [B or 1, E]
    (-1: none, scored 0) -> [B, T, E]. fp4_key entries are decoded in the kernel."""
    d = q.shape[-1]
    if fmt.kind not in ("plain", "fp4_key") or not supported(q) or d & (d - 1) or d < 32:
        idx = slots.clamp_min(0)
        if storage.shape[0] == 1:
            rows = storage[0][idx]
        else:
            idx = idx.expand(storage.shape[0], -1).unsqueeze(-1)
            rows = storage.gather(1, idx.expand(-1, -1, storage.shape[-1]))
        keys = fmt.decode(rows, torch.promote_types(q.dtype, torch.float32))
        return indexer_scores_torch(q, keys, weights)  # -1 slots: junk scores, never visible
    return _launch(q, weights, storage, slots.contiguous(), fmt.kind == "fp4_key",
                   slots.shape[-1])


@triton.jit
def _topk_kernel(s_ptr, v_ptr, v_sr, out_ptr, E, K, ID_BITS: tl.constexpr,
                 BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    inside = e < E
    vis = (tl.load(v_ptr + r * v_sr + e, mask=inside, other=0) != 0) & inside
    s = tl.load(s_ptr + r * E + e, mask=inside, other=0.0)
    s = tl.where(vis, tl.where(s == 0.0, 0.0, s), float("-inf"))  # -0.0 ties with +0.0
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    # monotone: negative floats flip all bits, non-negative ones get the top bit set
    order = tl.where(bits < 0, (~bits) & 0xFFFFFFFF, bits + 2147483648)
    key = (order << ID_BITS) | ((1 << ID_BITS) - 1 - e)
    key = tl.where(inside, key, -1)  # padding sorts last
    key = tl.sort(key, 0, descending=True)
    ids = (1 << ID_BITS) - 1 - (key & ((1 << ID_BITS) - 1))
    # chosen past the visible entries: -1 (invisible entries sort after all visible ones)
    n_vis = tl.sum(vis.to(tl.int32), axis=0)
    ids = tl.where(e < n_vis, ids, -1)
    tl.store(out_ptr + r * K + e, ids, mask=e < K)


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    e = scores.shape[-1]
    if not supported(scores) or scores.dtype != torch.float32 or e > _MAX_TOPK_ROW:
        return select_topk_torch(scores, visible, k)
    k = min(k, e)
    lead = scores.shape[:-1]
    s = scores.reshape(-1, e).contiguous()
    v = visible.expand(*lead, e).reshape(-1, e).contiguous().view(torch.uint8)
    out = torch.empty(s.shape[0], k, dtype=torch.long, device=scores.device)
    _topk_kernel[(s.shape[0],)](s, v, e, out, e, k, ID_BITS=_ID_BITS,
                                BLOCK=triton.next_power_of_2(e))
    return out.view(*lead, k)
