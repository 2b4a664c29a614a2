"""Mixture of experts (architecture.md 2.7): hash or sqrt-softplus routing, one shared expert.

Learned layers pick top-k of `score + bias` (the bias steers selection only); hash layers take the
experts from `tid2eid[token_id]`. Weights are the selected scores normalised to sum 1, times
`routed_scaling_factor`. Experts are clamped SwiGLU FFNs computed in at least fp32, the routing
weight applied before w2 as in the reference. Routed experts stay FP4 (or FP8) and are
dequantized only when a token visits them.

Over several ranks (dsv4.distributed.ParallelConfig) every rank routes every token the same way
(the gate and its bias are whole on each), computes the share of the routed experts it holds
(whole experts under EP, a slice of each expert's width otherwise), and the shares meet in one
collective; the shared expert is whole on each rank and is added afterwards. Under DP-attention
the data-parallel groups first gather each other's tokens (dispatch: all-gather), and each gets
back the sums for its own (combine: reduce-scatter, or all-reduce when a group has several
tensor-parallel ranks). Why not all-to-all: the gather/scatter pair has equal-size buffers, runs
the same on gloo and NCCL, and at the 4-8 ranks a V4 deployment spans, each token goes to most
ranks anyway (6 of 256 experts over 8 ranks reach ~4.4 ranks on average).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.distributed.parallel_context import ParallelContext
from dsv4.model.layers import upcast
from dsv4.model.linear import Linear, split
from dsv4.ops import OPS

__all__ = ["MoE", "Expert", "Gate", "routed_experts"]


def _formats(config: ModelConfig) -> tuple[str, str, torch.dtype]:
    dense = "fp8" if config.weight_dtype == "fp8" else "dense"
    expert = {"fp4": "fp4", "fp8": "fp8"}.get(config.expert_dtype or "", "dense")
    scale = torch.float8_e8m0fnu if config.scale_fmt == "ue8m0" else torch.float32
    return dense, expert, scale


class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, fmt: str, scale_dtype: torch.dtype,
                 limit: float, parts: int = 1, index: int = 0) -> None:
        """inter: the whole width; a rank holding part `index` of `parts` keeps inter/parts
        rows of w1/w3 and the matching w2 columns."""
        super().__init__()
        width, rows = inter // parts, split(0, parts, index)
        self.w1 = Linear(dim, width, fmt, scale_dtype, rows)
        self.w2 = Linear(width, dim, fmt, scale_dtype, split(1, parts, index))
        self.w3 = Linear(dim, width, fmt, scale_dtype, rows)
        self.limit = limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = upcast(self.w1(x)), upcast(self.w3(x))
        if self.limit > 0:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        h = F.silu(gate) * up
        if weights is not None:
            h = weights * h
        return self.w2(h.to(x.dtype))


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, is_hash: bool) -> None:
        super().__init__()
        self.topk, self.is_hash = config.num_experts_per_tok, is_hash
        self.score_func, self.route_scale = config.scoring_func, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size),
                                   requires_grad=False)
        if is_hash:
            self.register_buffer(
                "tid2eid", torch.zeros(config.vocab_size, self.topk, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], input_ids [N] -> (weights [N, k] in at least fp32, expert ids [N, k])."""
        xf = upcast(x)
        scores = F.linear(xf, self.weight.to(xf.dtype))
        if self.score_func == "softmax":
            scores = scores.softmax(-1)
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        if self.is_hash:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.route_scale, ids


def routed_experts(experts: nn.ModuleDict, n_experts: int, x: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum over each token's k picks of weight * expert(x), for the experts held here (keys: global
    expert ids); x [N, dim], weights / ids [N, k] -> [N, dim] in at least fp32 (the
    `moe_experts` op's reference: one call per visited expert, its weights dequantized)."""
    y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    counts = torch.bincount(ids.flatten(), minlength=n_experts).tolist()
    for key, expert in experts.items():
        if counts[int(key)] == 0:
            continue
        tok, slot = torch.where(ids == int(key))
        y.index_add_(0, tok, upcast(expert(x[tok], weights[tok, slot, None])))
    return y


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, is_hash: bool,
                 parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.parallel = par = parallel or ParallelContext.single()
        dense, expert, scale = _formats(config)
        d, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config, is_hash)
        # keyed by global expert id, so parameter names are the checkpoint's on every rank
        ids, parts, index = par.local_experts(config.n_routed_experts)
        self.experts = nn.ModuleDict(
            {str(e): Expert(d, inter, expert, scale, limit, parts, index) for e in ids})
        self.shared_experts = Expert(d, inter, dense, scale, limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        dp = self.parallel.dp
        tokens, token_ids = x, input_ids.reshape(-1)
        if dp.size > 1:  # dispatch: every group's tokens to every rank
            tokens, token_ids = self.parallel.dp_gather(x), self.parallel.dp_input_ids
        y = self._routed(tokens, token_ids)
        y = self._combine(y)
        y = y + upcast(self.shared_experts(x))
        return y.to(x.dtype).view(shape)

    def _routed(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the routed experts' output for tokens x [N, dim] (at least fp32)."""
        weights, ids = self.gate(x, input_ids)
        return self.dispatch(x, weights, ids)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
        """Tokens x [N, dim] through this rank's routed experts as the gate picked them
        (weights, ids [N, k]); at least fp32."""
        if x.is_meta:
            # shapes only (FLOP counting): every token visits k experts
            y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32),
                            device=x.device)
            experts = list(self.experts.values())
            for slot in range(ids.shape[1]):
                y = y + upcast(experts[slot % len(experts)](x, weights[:, slot:slot + 1]))
            return y
        return OPS.moe_experts(self.experts, self.n_experts, x, weights, ids)

    def _combine(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' shares; under DP-attention keep this group's own tokens."""
        par = self.parallel
        if par.dp.size == 1:
            return par.moe.all_reduce(y)
        if par.tp.size == 1:  # moe group == dp group: each rank gets its own rows summed
            return par.moe.reduce_scatter(y)[:par.dp_num_tokens[par.dp.rank]]
        rows = par.dp_rows_of(par.dp.rank)
        return par.moe.all_reduce(y)[rows]
