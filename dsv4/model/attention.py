"""Attention of every V4 layer kind (architecture.md 2.4): swa, csa and hca.

Low-rank query with a per-head unweighted RMSNorm, one shared K=V latent, partial interleaved RoPE,
a sliding window of `sliding_window` tokens (itself included) on every layer, plus compressed
entries: top-k picked by the indexer (csa) or all visible ones (hca). Window and compressed keys
compete in one softmax whose denominator also holds a per-head sink. The output's rope dims are
de-rotated at the query position, then projected by the grouped low-rank wo_a / wo_b.
Attention reads keys through index lists (gather), never a dense mask over the whole context.

Under tensor parallelism (as in the reference) a rank holds H/tp query heads with their sinks,
o_groups/tp output groups (wo_a rows) and the matching wo_b columns; wq_a, the K=V projection,
the norms and the compressors are whole on every rank. wo_b's partial sums meet in one
all-reduce, in at least fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.distributed.parallel_context import ParallelContext
from dsv4.model.cache_store import BatchedLayerStore, LayerStore
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer, KeySlots
from dsv4.model.layers import RMSNorm, RotaryEmbedding, rms_normalize, upcast
from dsv4.model.linear import Linear, split
from dsv4.ops import OPS

__all__ = ["Attention", "Segment", "DecodeRows", "Gathered", "Shared", "sparse_attention",
           "gather_rows", "segment_positions"]

# cap on gathered keys per query chunk (elements of [B, T, K, D]) to bound prefill memory
_GATHER_BUDGET = 1 << 25


@dataclass
class Segment:
    """Tokens [begin, end) of the flattened step are one sequence at positions start_pos..;
    `store` is that sequence's cache for the current layer (SequenceCache's LayerState, or the
    engine's RequestView.layer(i))."""

    begin: int
    end: int
    start_pos: int
    store: LayerStore


@dataclass
class DecodeRows:
    """R sequences with exactly one new token each, attended together (the engine's decode
    rows): `index` [R] are their tokens on the flattened step axis, `positions` [R] their
    absolute positions, `store` their batched cache for the current layer (the engine's
    DecodeGroup.layer(i))."""

    index: torch.Tensor
    positions: torch.Tensor
    store: BatchedLayerStore


def segment_positions(segments: list[Segment | DecodeRows], t: int,
                      device: torch.device) -> torch.Tensor:
    """Absolute position of every token on the step's T axis [T]; the same for every layer."""
    positions = torch.empty(t, dtype=torch.long, device=device)
    for seg in segments:
        if isinstance(seg, DecodeRows):
            positions[seg.index] = seg.positions
        else:
            positions[seg.begin:seg.end] = torch.arange(
                seg.start_pos, seg.start_pos + seg.end - seg.begin, device=device)
    return positions


def gather_rows(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv [B or 1, L, D], idx [B or 1, T, K] (-1 allowed) -> [B, T, K, D] (junk rows for -1)."""
    if kv.shape[0] == 1 and idx.shape[0] > 1:  # one shared pool, per-row indices
        return kv[0][idx.clamp_min(0)]
    b, _, d = kv.shape
    idx = idx.expand(b, -1, -1)
    t, k = idx.shape[1:]
    if kv.shape[1] == 0:
        return kv.new_zeros(b, t, k, d)
    flat = idx.clamp_min(0).reshape(b, t * k, 1).expand(-1, -1, d)
    return kv.gather(1, flat).view(b, t, k, d)


class Gathered(NamedTuple):
    """Keys picked per query: kv [B or 1, L, ...], idx [B or 1, T, K] (-1 = no key); decode
    turns stored rows into vectors (None: kv already holds vectors)."""

    kv: torch.Tensor
    idx: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


def _read(rows: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor] | None
          ) -> torch.Tensor:
    return rows if decode is None else decode(rows)


class Shared(NamedTuple):
    """Keys shared by all queries of a row, masked per query: keys [B, K, D],
    visible [B or 1, T, K]. No gather per query: the cheap form for windows and dense parts."""

    keys: torch.Tensor
    visible: torch.Tensor


def sparse_attention(q: torch.Tensor, sources: list[Gathered | Shared], sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One softmax over the keys of all sources plus a value-less sink logit (K = V).

    q [B, T, H, D] -> [B, T, H, D]."""
    qf = upcast(q)
    values, logits = [], []
    for src in sources:
        if isinstance(src, Shared):
            keys = upcast(src.keys)
            part = torch.einsum("bthd,bkd->bthk", qf, keys)
            valid = src.visible
        else:
            keys = upcast(_read(gather_rows(src.kv, src.idx), src.decode))  # [B, T, K, D]
            part = torch.einsum("bthd,btkd->bthk", qf, keys)
            valid = src.idx >= 0
        logits.append(part.masked_fill(~valid.unsqueeze(2), float("-inf")) * scale)
        values.append(keys)
    logit = torch.cat(logits, dim=-1) if len(logits) > 1 else logits[0]
    sink = sink.to(qf.dtype).view(1, 1, -1, 1)
    top = torch.maximum(logit.amax(-1, keepdim=True), sink)
    weights = (logit - top).exp()
    weights = weights / (weights.sum(-1, keepdim=True) + (sink - top).exp())
    out, start = None, 0
    for keys in values:
        k = keys.shape[-2]
        w = weights[..., start:start + k]
        start += k
        part = (torch.einsum("bthk,bkd->bthd", w, keys) if keys.dim() == 3
                else torch.einsum("bthk,btkd->bthd", w, keys))
        out = part if out is None else out + part
    return out.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, rope: RotaryEmbedding | None = None,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        fmt = "fp8" if config.weight_dtype == "fp8" else "dense"
        sdt = torch.float8_e8m0fnu if config.scale_fmt == "ue8m0" else torch.float32
        self.config, self.ratio = config, ratio
        self.tp = (parallel or ParallelContext.single()).tp
        # this rank's heads and output groups
        self.n_heads = config.num_attention_heads // self.tp.size
        self.n_groups = config.o_groups // self.tp.size
        self.head_dim = config.head_dim
        self.window = config.sliding_window
        self.scale = config.head_dim**-0.5
        rows, cols = split(0, self.tp.size, self.tp.rank), split(1, self.tp.size, self.tp.rank)
        self.wq_a = Linear(config.hidden_size, config.q_lora_rank, fmt, sdt)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, fmt, sdt, rows)
        self.wkv = Linear(config.hidden_size, self.head_dim, fmt, sdt)
        self.kv_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        group_in = config.num_attention_heads * self.head_dim // config.o_groups
        self.wo_a = Linear(group_in, self.n_groups * config.o_lora_rank, fmt, sdt, rows)
        self.wo_b = Linear(self.n_groups * config.o_lora_rank, config.hidden_size, fmt, sdt,
                           cols)
        self.attn_sink = nn.Parameter(torch.empty(self.n_heads), requires_grad=False)
        self.shards = {"attn_sink": rows}
        self.rope = rope or RotaryEmbedding(config, compressed=ratio > 0)
        self.compressor = (Compressor(config, ratio, self.head_dim, rotate=False, rope=self.rope)
                           if ratio else None)
        self.indexer = Indexer(config, self.rope, fmt, self.tp) if ratio == 4 else None
        self.emulate_quant = True

    def forward(self, x: torch.Tensor, segments: list[Segment | DecodeRows],
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] (normed) -> [B, T, dim]; positions [T] as segment_positions gives them
        (computed here when not passed).

        `segments` split the T axis into runs of consecutive positions of one sequence (batch
        row group): a SequenceCache forward is one segment over everything; an engine step has
        one segment per request (B = 1). Projections run on all tokens at once; the cache work
        and the attention itself run per segment."""
        if positions is None:
            positions = segment_positions(segments, x.shape[1], x.device)
        cos, sin = self.rope.step(positions)
        q, q_lora, kv = self.project_in(x, cos, sin)
        o = torch.empty_like(q)
        for seg in segments:
            if isinstance(seg, DecodeRows):
                i = seg.index
                o[0, i] = self.attend_rows(x[0, i], q[0, i], q_lora[0, i], kv[0, i],
                                            seg.positions, seg.store)
                continue
            if seg.end == seg.begin:  # an idle data-parallel rank's empty step
                continue
            sl = slice(seg.begin, seg.end)
            o[:, sl] = self._attend(x[:, sl], q[:, sl], q_lora[:, sl], kv[:, sl],
                                    positions[sl], seg.start_pos, seg.store)
        return self.project_out(o, cos, sin)

    def project_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-token part before the cache: x [B, T, dim] (normed) -> q [B, T, H, D] (normed,
        rotated), q_lora [B, T, q_lora_rank], kv [B, T, D] (rotated, QAT-rounded when on)."""
        q_lora = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lora).unflatten(-1, (self.n_heads, self.head_dim))
        q = rms_normalize(q, self.config.rms_norm_eps).to(x.dtype)
        kv = self.kv_norm(self.wkv(x))
        q = OPS.rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        kv = OPS.rope(kv, cos, sin)
        if self.emulate_quant:
            kv = OPS.kv_quant(kv, self.config.qk_rope_head_dim)
        return q, q_lora, kv

    def project_out(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The per-token part after attention: o [B, T, H, D] -> [B, T, dim]."""
        o = OPS.rope(o, cos.unsqueeze(1), sin.unsqueeze(1), inverse=True)
        return self._project_out(o)

    def _attend(self, x: torch.Tensor, q: torch.Tensor, q_lora: torch.Tensor, kv: torch.Tensor,
                positions: torch.Tensor, start_pos: int, store: LayerStore) -> torch.Tensor:
        """One sequence (group) at positions start_pos..: update its cache, attend."""
        b, t = x.shape[:2]
        # window keys: up to window-1 tokens before this chunk, then the chunk itself
        hist = min(start_pos, self.window - 1)
        history = store.window_history(hist)
        win_kv = kv if history is None else torch.cat([history, kv], dim=1)
        store.save_window(kv, win_kv)

        n_entries = 0
        if self.compressor is not None:
            self.compressor(x, start_pos, store.compressor)
            if self.indexer is not None:
                self.indexer.compressor(x, start_pos, store.indexer)
            n_entries = (start_pos + t) // self.ratio
        dense = None  # all entries, when every visible one is attended (hca, or csa below top-k)
        if n_entries:
            storage, slots, decode = store.compressor.entry_slots(n_entries)
            if self.indexer is None or n_entries <= self.config.index_topk:
                dense = _read(storage[:, slots], decode)  # [B, E, D]
            else:
                key_storage, key_slots, key_decode = store.indexer.entry_slots(n_entries)
                keys = (KeySlots(key_storage, key_slots.unsqueeze(0), key_decode)
                        if OPS.triton("indexer_scores")  # read in place by the kernel
                        else _read(key_storage[:, key_slots], key_decode))
        ids = torch.arange(n_entries, device=x.device)
        chosen = None  # csa past top-k: entry ids per query, picked for the whole chunk at once
        if dense is None and n_entries:
            chosen = self.indexer.select(x, q_lora, positions[None], keys)
        outs = []
        step = self.window  # queries per chunk; each sees at most 2 * window - 1 window keys
        if dense is None and n_entries:
            step = max(1, min(step, _GATHER_BUDGET // (b * self.config.index_topk * self.head_dim)))
        for s in range(0, t, step):
            e = min(t, s + step)
            lo, hi = max(0, s + hist - self.window + 1), e + hist
            query = torch.arange(s + hist, e + hist, device=x.device).unsqueeze(1)
            key = torch.arange(lo, hi, device=x.device)
            band = (key <= query) & (key > query - self.window)  # [T_c, K]
            sources: list[Gathered | Shared] = [Shared(win_kv[:, lo:hi], band.unsqueeze(0))]
            if n_entries:
                pos = positions[s:e]
                visible = ids < ((pos + 1) // self.ratio).unsqueeze(-1)  # [T_c, E]
                if dense is not None:
                    sources.append(Shared(dense, visible.unsqueeze(0)))
                else:
                    idx = chosen[:, s:e]
                    slot_idx = torch.where(idx >= 0, slots[idx.clamp_min(0)], idx)
                    sources.append(Gathered(storage, slot_idx, decode))
            outs.append(OPS.sparse_attention(q[:, s:e], sources, self.attn_sink, self.scale))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def attend_rows(self, x: torch.Tensor, q: torch.Tensor, q_lora: torch.Tensor,
                    kv: torch.Tensor, positions: torch.Tensor, store: BatchedLayerStore
                    ) -> torch.Tensor:
        """R single-token sequences at once (x [R, dim], q [R, H, D], kv [R, D]) -> [R, H, D].

        With the Triton attention the window and the dense compressed entries are handed over
        as cache slots (Gathered), read in place by the kernel; the torch code gets vectors."""
        in_place = OPS.triton("sparse_attention")
        if in_place:
            win_storage, win_slots, win_decode = store.window_entries(kv)  # [R, W] slots
            sources: list[Gathered | Shared] = [Gathered(win_storage, win_slots.unsqueeze(1),
                                                         win_decode)]
        else:
            win_keys, win_valid = store.window(kv)  # [R, W, D], [R, W]
            sources = [Shared(win_keys, win_valid.unsqueeze(1))]
        if self.compressor is not None:
            self.compressor.decode_step(x, positions, store.compressor)
            if self.indexer is not None:
                self.indexer.compressor.decode_step(x, positions, store.indexer)
            n_entries = store.compressor.num_entries
            if n_entries:
                # [1, S, ...], [R, E] (-1: none), decoder
                storage, slots, decode = store.compressor.entry_slots()
                if (self.indexer is None or n_entries <= self.config.index_topk) and in_place:
                    sources.append(Gathered(storage, slots.unsqueeze(1), decode))
                elif self.indexer is None or n_entries <= self.config.index_topk:
                    dense = _read(storage[0][slots.clamp_min(0)], decode)  # [R, E, D]
                    sources.append(Shared(dense, (slots >= 0).unsqueeze(1)))
                else:
                    key_storage, key_slots, key_decode = store.indexer.entry_slots()
                    keys = (KeySlots(key_storage, key_slots, key_decode)
                            if OPS.triton("indexer_scores")  # read in place by the kernel
                            else _read(key_storage[0][key_slots.clamp_min(0)], key_decode))
                    ids = self.indexer.select(x[:, None], q_lora[:, None], positions[:, None],
                                              keys)[:, 0]  # [R, k]
                    slot_idx = torch.where(ids >= 0, slots.gather(1, ids.clamp_min(0)), -1)
                    sources.append(Gathered(storage, slot_idx.unsqueeze(1), decode))
        return OPS.sparse_attention(q.unsqueeze(1), sources, self.attn_sink, self.scale)[:, 0]

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        g = self.n_groups
        o = o.flatten(2).unflatten(-1, (g, -1))  # [B, T, G, H/G * D]
        wo_a = self.wo_a.dense_weight(o.dtype).unflatten(0, (g, -1))  # [G, R, H/G * D]
        z = torch.einsum("btgi,gri->btgr", o, wo_a)
        out = self.wo_b(z.flatten(2))
        if self.tp.size == 1:
            return out
        return self.tp.all_reduce(upcast(out)).to(out.dtype)

    def set_emulate_quant(self, on: bool) -> None:
        self.emulate_quant = on
        for mod in (self.compressor, self.indexer, getattr(self.indexer, "compressor", None)):
            if mod is not None:
                mod.emulate_quant = on
