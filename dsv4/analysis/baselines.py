"""DeepSeek-V3 and V3.2 described just far enough to count their decode FLOPs and KV bytes.

They are not V4 networks, so they do not use ``dsv4.config.ModelConfig``. Both are MLA models
(latent 512 + RoPE 64, 128 heads, 61 layers, first 3 dense); V3.2 adds the DSA lightning
indexer (64 heads x 128, top-2048 tokens per query). Values: DeepSeek-V3/V3.2 config.json as
summarised in docs/performance.md (section 2, Appendix A) and docs/architecture.md (section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINES", "MLAConfig"]


@dataclass(frozen=True)
class MLAConfig:
    """Hyper-parameters of a DeepSeek-V3-family (MLA) model that matter for decode cost."""

    name: str
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432  # the dense FFN of the first layers
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    # DSA lightning indexer (V3.2); index_topk == 0 means dense MLA (V3)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0


BASELINES: dict[str, MLAConfig] = {
    "v3": MLAConfig(name="DeepSeek-V3"),
    "v3.2": MLAConfig(name="DeepSeek-V3.2", index_n_heads=64, index_head_dim=128,
                      index_topk=2048),
}
