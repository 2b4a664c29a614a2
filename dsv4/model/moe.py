"""Mixture of experts (architecture.md 2.7): hash or sqrt-softplus routing, one shared expert.

Learned layers pick top-k of `score + bias` (the bias steers selection only); hash layers take the
experts from `tid2eid[token_id]`. Weights are the selected scores normalised to sum 1, times
`routed_scaling_factor`. Experts are clamped SwiGLU FFNs computed in at least fp32, the routing
weight applied before w2 as in the reference. Routed experts stay FP4 (or FP8) and are
dequantized only when a token visits them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.layers import upcast
from dsv4.model.linear import Linear

__all__ = ["MoE", "Expert", "Gate"]


def _formats(config: ModelConfig) -> tuple[str, str, torch.dtype]:
    dense = "fp8" if config.weight_dtype == "fp8" else "dense"
    expert = {"fp4": "fp4", "fp8": "fp8"}.get(config.expert_dtype or "", "dense")
    scale = torch.float8_e8m0fnu if config.scale_fmt == "ue8m0" else torch.float32
    return dense, expert, scale


class Expert(nn.Module):
    def __init__(self, dim: int, inter: int, fmt: str, scale_dtype: torch.dtype,
                 limit: float) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter, fmt, scale_dtype)
        self.w2 = Linear(inter, dim, fmt, scale_dtype)
        self.w3 = Linear(dim, inter, fmt, scale_dtype)
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


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, is_hash: bool) -> None:
        super().__init__()
        dense, expert, scale = _formats(config)
        d, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.gate = Gate(config, is_hash)
        self.experts = nn.ModuleList(
            Expert(d, inter, expert, scale, limit) for _ in range(config.n_routed_experts))
        self.shared_experts = Expert(d, inter, dense, scale, limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, input_ids.reshape(-1))
        y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32),
                        device=x.device)
        if x.is_meta:
            # shapes only (FLOP counting): every token visits k experts
            for slot in range(ids.shape[1]):
                y = y + upcast(self.experts[slot](x, weights[:, slot:slot + 1]))
        else:
            counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
            for e, count in enumerate(counts):
                if count == 0:
                    continue
                tok, slot = torch.where(ids == e)
                y.index_add_(0, tok, upcast(self.experts[e](x[tok], weights[tok, slot, None])))
        y = y + upcast(self.shared_experts(x))
        return y.to(x.dtype).view(shape)
