"""Checkpoint tensor names: transformers' spellings -> the official one.

The model's modules are named like the official release (architecture.md 4.1), so official
checkpoints load by name. transformers names modules its own way and merges routed experts into
3-D `gate_up_proj` / `down_proj` tensors (architecture.md 4.4); its `save_pretrained` writes a
partly reversed hybrid (`model.` prefix, `embed_tokens`, `hc_head.hc_fn`, and the attention's
`kv_norm` as `attn.norm`). `official_items` maps all of these back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

__all__ = ["is_hf_naming", "official_items", "released_in_fp32"]

# applied in order to names with the leading "model." removed
_HF_RULES: list[tuple[str, str]] = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),  # save_pretrained's lossy reverse
    (r"\.kv_proj\.", ".wkv."),
    (r"(compressor)\.gate_proj\.", r"\1.wgate."),
    (r"(compressor)\.kv_norm\.", r"\1.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.weight_scale_inv$", ".scale"),
]
_COMPILED = [(re.compile(p), r) for p, r in _HF_RULES]


def released_in_fp32(name: str) -> bool:
    """Tensors the official release stores in fp32 (mHC maps, position biases, sinks, gate
    bias); other dense tensors are bf16 there."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("hc_") or leaf in ("ape", "attn_sink", "bias")


def is_hf_naming(names: list[str]) -> bool:
    return any(n.startswith(("model.layers.", "model.embed_tokens.", "lm_head.")) for n in names)


def hf_to_official(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, repl in _COMPILED:
        name = pattern.sub(repl, name)
    return name


def official_items(name: str, tensor: torch.Tensor, hf: bool
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (official name, tensor) pairs for one stored tensor."""
    if not hf:
        yield name, tensor
        return
    name = hf_to_official(name)
    merged = re.match(r"^(.*\.ffn\.experts)\.(gate_up_proj|down_proj)$", name)
    if merged is None:
        yield name, tensor
        return
    prefix, kind = merged.groups()
    for e in range(tensor.shape[0]):
        if kind == "down_proj":
            yield f"{prefix}.{e}.w2.weight", tensor[e]
        else:
            w1, w3 = tensor[e].chunk(2, dim=0)
            yield f"{prefix}.{e}.w1.weight", w1
            yield f"{prefix}.{e}.w3.weight", w3
