"""Measured FLOPs: run dsv4's real model for one decode token on the meta device.

The network is built at real widths with a few layers of each kind (``reduced_config``), a
synthetic cache makes it look as if ``context`` tokens had been processed, and
``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products of one decode step,
attributed to each ``layers[i]`` call; the rest (hc_head, lm_head) is "head". ``compare``
sets these against the analytic counts of ``dsv4.analysis.flops``, per layer kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.analysis.flops import v4_layer_flops, v4_top_flops
from dsv4.config import ModelConfig

__all__ = ["KindCheck", "compare", "measure", "model_api_available", "reduced_config"]

def model_api_available() -> bool:
    """True once ``dsv4.model`` has DeepseekV4ForCausalLM and SequenceCache.synthetic."""
    try:
        import dsv4.model as m
    except ImportError:
        return False
    return hasattr(m, "DeepseekV4ForCausalLM") and hasattr(
        getattr(m, "SequenceCache", None), "synthetic")


def reduced_config(cfg: ModelConfig, ratios: tuple[int, ...] | None = None) -> ModelConfig:
    """Same widths, few layers: by default SWA, CSA, HCA twice each (first two hash-routed)."""
    if ratios is None:
        ratios = (0, 4, cfg.hca_ratio, 4, cfg.hca_ratio, 0)
    return cfg.replace(num_hidden_layers=len(ratios), compress_ratios=tuple(ratios),
                       num_hash_layers=min(cfg.num_hash_layers, 2), num_nextn_predict_layers=0)


def measure(cfg: ModelConfig, context: int) -> tuple[list[int], int]:
    """(matmul FLOPs of each trunk layer, FLOPs outside the layers) for one decode token.

    Per-layer FLOPs are the growth of the counter's global total across each ``layers[i]``
    call (forward hooks), so they do not depend on how the model names its modules."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dsv4.model import DeepseekV4ForCausalLM, SequenceCache

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, emulate_quant=False)
    model.eval()
    cache = SequenceCache.synthetic(cfg, context, batch=1, device="meta", dtype=torch.float32)
    ids = torch.zeros(1, 1, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    per_layer = [0] * cfg.num_hidden_layers
    start: dict[int, int] = {}
    handles = []
    for i, layer in enumerate(model.layers):
        def pre(_m: object, _a: object, i: int = i) -> None:
            start[i] = counter.get_total_flops()

        def post(_m: object, _a: object, _o: object, i: int = i) -> None:
            per_layer[i] += counter.get_total_flops() - start.pop(i)

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        with torch.no_grad(), counter:
            logits = model(ids, cache)
    finally:
        for h in handles:
            h.remove()
    if tuple(logits.shape) != (1, 1, cfg.vocab_size):
        raise RuntimeError(f"the decode step returned logits of shape {tuple(logits.shape)}")
    return per_layer, counter.get_total_flops() - sum(per_layer)


@dataclass(frozen=True)
class KindCheck:
    kind: str  # "swa" | "csa" | "hca" | "head"
    layers: int
    analytic: int
    measured: int

    @property
    def rel_err(self) -> float:
        return abs(self.measured - self.analytic) / max(self.analytic, 1)


def compare(cfg: ModelConfig, context: int,
            ratios: tuple[int, ...] | None = None) -> list[KindCheck]:
    """Analytic vs measured matmul FLOPs per layer kind (summed over the layers of that kind)."""
    small = reduced_config(cfg, ratios)
    per_layer, rest = measure(small, context)
    sums: dict[str, list[int]] = {}
    for i, kind in enumerate(small.layer_kinds):
        s = sums.setdefault(kind, [0, 0, 0])
        s[0] += 1
        s[1] += sum(v4_layer_flops(small, i, context).values())
        s[2] += per_layer[i]
    out = [KindCheck(k, n, a, m) for k, (n, a, m) in sums.items()]
    out.append(KindCheck("head", 1, sum(v4_top_flops(small).values()), rest))
    return out
