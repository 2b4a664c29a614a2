"""Lightning indexer of CSA layers (architecture.md 2.6) and its deterministic top-k.

Score of compressed entry w for query p: sum_h w_h * ReLU(q_h . K_w), with q from the attention's
low-rank query c_q and K from the indexer's own ratio-4 compressor. ReLU makes exact ties common,
so selection is *deterministic*: higher score first, then lower entry index (a stable descending
sort). Every path (full forward, chunked prefill, decode) selects through `select_topk`, so they
agree whenever the scores agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.distributed.comm import Comm
from dsv4.model.compressor import Compressor
from dsv4.model.layers import RotaryEmbedding, upcast
from dsv4.model.linear import Linear, split
from dsv4.ops import OPS
from dsv4.quant import fake_quant_fp4, hadamard

__all__ = ["Indexer", "KeySlots", "indexer_scores", "select_topk"]

# elements of one block's [B, T, heads, E] logits: 8 MiB of fp32 stays in cache; 1 << 25
# made a 16K-token CPU prefill 1.3x slower (benchmarks: single-process A/B in BENCHMARKS.md)
_SCORE_BUDGET = 1 << 21


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k entry ids per query with ties broken by lower id; -1 where fewer are visible.

    scores [..., E]; visible [..., E] bool; returns [..., min(k, E)] int64, best first.
    O(E): the k-th best score is found with topk, every entry above it is taken, and entries
    equal to it are taken lowest id first until k are chosen; only the k chosen are sorted.
    """
    e = scores.shape[-1]
    k = min(k, e)
    masked = scores.masked_fill(~visible, float("-inf"))
    kth = masked.topk(k, dim=-1).values[..., -1:]
    greater, equal = masked > kth, masked == kth
    need = k - greater.sum(-1, keepdim=True)
    take = greater | (equal & (equal.cumsum(-1) <= need))  # exactly k per row
    rank = torch.arange(e, 0, -1, device=scores.device)  # larger for lower ids
    ids = torch.where(take, rank, 0).topk(k, dim=-1).indices  # chosen, ascending id
    order = torch.sort(masked.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    ids = ids.gather(-1, order)
    return torch.where(visible.gather(-1, ids), ids, torch.full_like(ids, -1))


class KeySlots(NamedTuple):
    """Indexer keys left in the cache, for a kernel that reads them in place (the Triton
    `indexer_scores`): storage [B or 1, S, ...], slots [B or 1, E] (-1: none), decode (None:
    stored as vectors)."""

    storage: torch.Tensor
    slots: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] | None


def _num_entries(keys: torch.Tensor | KeySlots) -> int:
    return keys.slots.shape[-1] if isinstance(keys, KeySlots) else keys.shape[1]


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_h weights_h * ReLU(q_h . K_e): q [B, T, H, D], keys [B, E, D], weights [B, T, H]
    (at least fp32) -> [B, T, E] (the `indexer_scores` op's reference)."""
    logits = torch.einsum("bthd,bed->bthe", upcast(q), upcast(keys))
    return (logits.relu() * weights.unsqueeze(-1)).sum(dim=2)


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, wq_b_fmt: str,
                 tp: Comm | None = None) -> None:
        super().__init__()
        self.tp = tp or Comm()
        self.n_heads = config.index_n_heads // self.tp.size  # this rank's
        self.head_dim = config.index_head_dim
        # weights are scaled by the whole model's head count, whatever the split
        self.weight_scale = self.head_dim**-0.5 * config.index_n_heads**-0.5
        self.topk = config.index_topk
        rows = split(0, self.tp.size, self.tp.rank)
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, wq_b_fmt,
                           shard=rows)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, shard=rows)
        self.compressor = Compressor(config, 4, self.head_dim, rotate=True, rope=rope)
        self.rope = rope
        self.emulate_quant = True

    def select(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
               keys: torch.Tensor | KeySlots) -> torch.Tensor:
        """Pick compressed entries for each query.

        x [B, T, dim] (normed layer input), q_lora [B, T, q_lora_rank], positions [B or 1, T],
        keys [B, E, index_head_dim] (or KeySlots, for the Triton scores); returns [B, T, min(k, E)] entry ids, -1 = none.
        Queries are scored in blocks whose [B, T, heads, E] logits stay under _SCORE_BUDGET
        elements; under tensor parallelism each block is one all-reduce (one per call, unless
        T x heads x E passes the budget: a long prefill chunk at a long context).
        """
        b, t, e = x.shape[0], x.shape[1], _num_entries(keys)
        rows = max(1, _SCORE_BUDGET // max(1, b * self.n_heads * e))
        if t <= rows:
            return self._select(x, q_lora, positions, keys)
        return torch.cat([self._select(x[:, s:s + rows], q_lora[:, s:s + rows],
                                       positions[:, s:s + rows], keys)
                          for s in range(0, t, rows)], dim=1)

    def _select(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
                keys: torch.Tensor | KeySlots) -> torch.Tensor:
        q = self.wq_b(q_lora).unflatten(-1, (self.n_heads, self.head_dim))
        cos, sin = self.rope(positions)
        q = OPS.rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        if self.emulate_quant:
            q = fake_quant_fp4(hadamard(q))
        weights = upcast(self.weights_proj(x)) * self.weight_scale
        scores = self.tp.all_reduce(OPS.indexer_scores(q, keys, weights))  # [B, T, E]
        entry = torch.arange(_num_entries(keys), device=x.device)
        visible = entry < ((positions + 1) // 4).unsqueeze(-1)  # [B or 1, T, E]
        return OPS.indexer_topk(scores, visible.expand_as(scores), self.topk)
