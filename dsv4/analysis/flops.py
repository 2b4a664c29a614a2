"""Analytic matmul FLOPs of one decode token, by component, for V4 and the MLA baselines.

Accounting: 2 FLOPs per multiply-accumulate, matrix products only (what
``torch.utils.flop_counter.FlopCounterMode`` counts); norms, RoPE, softmax, Sinkhorn, SwiGLU,
top-k and the compressor's pooling are elementwise and left out. ``context`` is the number of
tokens already processed: the decoded token sits at position ``p = context`` and sees
``context + 1`` tokens (itself included), exactly like ``model(ids, cache)`` after
``SequenceCache.synthetic(config, context)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from dsv4.analysis.baselines import MLAConfig
from dsv4.config import ModelConfig

__all__ = [
    "COMPONENTS",
    "AnyConfig",
    "flops_per_token",
    "layer_flops",
    "mla_layer_flops",
    "mla_top_flops",
    "top_flops",
    "total",
    "v4_layer_flops",
    "v4_top_flops",
]

AnyConfig = ModelConfig | MLAConfig

# flat component keys, in display order
COMPONENTS = (
    "linear.attention",  # q / kv / output projections (MLA: incl. the absorbed W_UK, W_UV)
    "linear.moe",  # router, routed experts (top-k), shared expert; dense FFN of V3 layers 0-2
    "attention.swa",  # scores + values over the sliding window (V4 SWA-only layers)
    "attention.csa",  # window + indexer top-k compressed entries
    "attention.hca",  # window + every visible compressed entry
    "attention.mla",  # V3: all tokens; V3.2: DSA top-k tokens
    "indexer.proj",  # indexer query (and V3.2 key) projection, head weights
    "indexer.scores",  # q . K over every visible indexer key
    "compressor",  # V4 compressor wkv / wgate projections of the new token
    "mhc",  # hyper-connection maps (phi) and stream mixing; hc_head's map
    "head",  # lm_head
)


def _add(out: dict[str, int], key: str, macs: int) -> None:
    out[key] = out.get(key, 0) + 2 * macs


# ---- DeepSeek-V4 ----------------------------------------------------------------------------
def _mhc_macs(n: int, d: int) -> int:
    """phi: (2n + n^2) x n*d, the collapse sum_j pre_j X_j: n*d (a [1 x n] x [n x d] matmul
    per token) and the stream mixing P^T X: n*n*d."""
    return (2 * n + n * n) * n * d + n * d + n * n * d


def v4_layer_flops(cfg: ModelConfig, layer_id: int, context: int) -> dict[str, int]:
    """Matmul FLOPs of trunk layer ``layer_id`` for one token decoded after ``context``."""
    d, c, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    dq, g, dg = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    ni, ci = cfg.index_n_heads, cfg.index_head_dim
    ratio = cfg.compress_ratios[layer_id]
    kind = cfg.kind_of_ratio(ratio)
    seen = context + 1
    out: dict[str, int] = {}
    # wq_a, wq_b, wkv, grouped wo_a (g groups of (nh/g * c) -> dg), wo_b
    _add(out, "linear.attention", d * dq + dq * nh * c + d * c + nh * c * dg + g * dg * d)
    keys = min(cfg.sliding_window, seen)
    if kind == "csa":
        entries = seen // ratio
        keys += min(cfg.index_topk, entries)
        if entries > cfg.index_topk:  # below that the top-k is every visible entry: no scoring
            _add(out, "indexer.proj", dq * ni * ci + d * ni)
            _add(out, "indexer.scores", ni * ci * entries)
        # main compressor (overlap: 2 x 512 wide) and the indexer's own (2 x 128), wkv + wgate
        _add(out, "compressor", 2 * (2 * c) * d + 2 * (2 * ci) * d)
    elif kind == "hca":
        keys += seen // ratio
        _add(out, "compressor", 2 * c * d)
    _add(out, f"attention.{kind}", nh * keys * (c + c))  # q.K (512) and a.V (512), K = V
    # router scores run on hash layers too; top-k routed experts + shared, 3 matrices each
    n_ffn = cfg.num_experts_per_tok + cfg.n_shared_experts
    _add(out, "linear.moe", cfg.n_routed_experts * d + n_ffn * 3 * d * cfg.moe_intermediate_size)
    _add(out, "mhc", 2 * _mhc_macs(cfg.hc_mult, d))  # one for attention, one for the FFN
    return out


def v4_top_flops(cfg: ModelConfig) -> dict[str, int]:
    """Outside the layers: hc_head's map (phi_h: n x n*d) and collapse (n*d), the lm_head."""
    n, d = cfg.hc_mult, cfg.hidden_size
    out: dict[str, int] = {}
    _add(out, "mhc", n * n * d + n * d)
    _add(out, "head", d * cfg.vocab_size)
    return out


# ---- DeepSeek-V3 / V3.2 ---------------------------------------------------------------------
def mla_layer_flops(cfg: MLAConfig, layer_id: int, context: int) -> dict[str, int]:
    """Absorbed-MLA decode (as DeepSeek serves it): scores over the 576-dim latent+rope,
    values over the 512-dim latent; W_UK is folded into the query, W_UV into the output."""
    d, nh, dq = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank
    dc, r, dn, dv = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    seen = context + 1
    out: dict[str, int] = {}
    _add(out, "linear.attention",
         d * dq + dq * nh * (dn + r) + d * (dc + r) + nh * dn * dc + nh * dc * dv + nh * dv * d)
    keys = min(cfg.index_topk, seen) if cfg.has_indexer else seen
    _add(out, "attention.mla", nh * keys * (dc + r) + nh * keys * dc)
    if cfg.has_indexer:
        ni, ci = cfg.index_n_heads, cfg.index_head_dim
        _add(out, "indexer.proj", dq * ni * ci + d * ci + d * ni)  # wq_b, wk, weights_proj
        _add(out, "indexer.scores", ni * ci * seen)
    if layer_id < cfg.first_k_dense_replace:
        _add(out, "linear.moe", 3 * d * cfg.intermediate_size)
    else:
        n_ffn = cfg.num_experts_per_tok + cfg.n_shared_experts
        _add(out, "linear.moe",
             cfg.n_routed_experts * d + n_ffn * 3 * d * cfg.moe_intermediate_size)
    return out


def mla_top_flops(cfg: MLAConfig) -> dict[str, int]:
    return {"head": 2 * cfg.hidden_size * cfg.vocab_size}


# ---- generic --------------------------------------------------------------------------------
def layer_flops(cfg: AnyConfig, layer_id: int, context: int) -> dict[str, int]:
    if isinstance(cfg, MLAConfig):
        return mla_layer_flops(cfg, layer_id, context)
    return v4_layer_flops(cfg, layer_id, context)


def top_flops(cfg: AnyConfig) -> dict[str, int]:
    return mla_top_flops(cfg) if isinstance(cfg, MLAConfig) else v4_top_flops(cfg)


def flops_per_token(cfg: AnyConfig, context: int) -> dict[str, int]:
    """Per-component matmul FLOPs of one decode token (trunk layers + head; MTP excluded)."""
    out: dict[str, int] = {}
    parts = [layer_flops(cfg, i, context) for i in range(cfg.num_hidden_layers)]
    for part in [*parts, top_flops(cfg)]:
        for key, value in part.items():
            out[key] = out.get(key, 0) + value
    return {k: out[k] for k in COMPONENTS if k in out}


def total(parts: Mapping[str, int | float]) -> int | float:
    return sum(parts.values())
