"""Compute the per-model numbers of ``dsv4 analyze`` and check them against DeepSeek's claims.

``analyze`` resolves model names (V4 presets, ``v3``, ``v3.2`` or a checkpoint directory),
counts FLOPs per token and KV bytes per sequence at one context, and forms the ratios to the
baseline. ``claim_checks`` recomputes DeepSeek's published comparison (1M tokens, vs V3.2) in
every storage format. Rendering lives in ``dsv4.analysis.text`` and ``dsv4.analysis.plot``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv4.analysis.baselines import BASELINES
from dsv4.analysis.flops import AnyConfig, flops_per_token
from dsv4.analysis.kv import entry_bytes, kv_bytes_per_sequence, kv_bytes_per_token
from dsv4.config import PRESETS, ModelConfig

__all__ = [
    "CLAIMS",
    "CLAIM_BASELINE",
    "CLAIM_CONTEXT",
    "MATCH_TOLERANCE",
    "Analysis",
    "ClaimCheck",
    "ModelResult",
    "analyze",
    "claim_checks",
    "resolve_model",
    "to_json",
]

CLAIM_CONTEXT = 1 << 20
CLAIM_BASELINE = "v3.2"
# DeepSeek: model card (Pro) and technical report Fig. 1 (Flash), both vs V3.2 at 1M tokens
CLAIMS: dict[str, dict[str, float]] = {
    "v4-pro": {"flops": 0.27, "kv": 0.10},
    "v4-flash": {"flops": 0.10, "kv": 0.07},
}
MATCH_TOLERANCE = 0.01  # claims are whole percents: a match is within 1 percentage point

NAMES = {"v4-flash": "V4-Flash", "v4-pro": "V4-Pro", "v4-flash-base": "V4-Flash-Base",
         "v4-pro-base": "V4-Pro-Base", "v3": "V3", "v3.2": "V3.2"}


def resolve_model(spec: str) -> tuple[str, str, AnyConfig]:
    """(key, display name, config) for a preset name, ``v3``/``v3.2`` or a checkpoint dir."""
    key = spec.lower()
    if key in BASELINES:
        return key, NAMES[key], BASELINES[key]
    if key in PRESETS:
        return key, NAMES.get(key, spec), PRESETS[key]
    path = Path(spec)
    if path.exists():
        return spec, path.resolve().name or spec, ModelConfig.from_pretrained(path)
    known = ", ".join([*PRESETS, *BASELINES])
    raise ValueError(f"unknown model {spec!r}: not one of {known} and not a checkpoint dir")


@dataclass(frozen=True)
class ModelResult:
    key: str
    name: str
    config: AnyConfig = field(repr=False)
    flops: dict[str, int]
    kv: dict[str, int]
    kv_per_token: float
    entry: tuple[int, int]

    @property
    def flops_total(self) -> int:
        return sum(self.flops.values())

    @property
    def kv_total(self) -> int:
        return sum(self.kv.values())


@dataclass(frozen=True)
class Analysis:
    context: int
    kv_format: str
    index_keys: str
    baseline: str
    results: list[ModelResult]  # requested models in order, then the baseline if not requested

    def result(self, key: str) -> ModelResult:
        return next(r for r in self.results if r.key == key)

    @property
    def base(self) -> ModelResult:
        return self.result(self.baseline)

    def flops_ratio(self, key: str) -> float:
        return self.result(key).flops_total / self.base.flops_total

    def kv_ratio(self, key: str) -> float:
        return self.result(key).kv_total / self.base.kv_total


def model_result(spec: str, context: int, kv_format: str, index_keys: str) -> ModelResult:
    key, name, cfg = resolve_model(spec)
    return ModelResult(
        key=key, name=name, config=cfg, flops=flops_per_token(cfg, context),
        kv=kv_bytes_per_sequence(cfg, context, kv_format, index_keys),
        kv_per_token=kv_bytes_per_token(cfg, kv_format, index_keys),
        entry=entry_bytes(cfg, kv_format, index_keys),
    )


def analyze(models: list[str], context: int, baseline: str = CLAIM_BASELINE,
            kv_format: str = "fp8", index_keys: str = "fp4") -> Analysis:
    """Numbers for ``models`` (first one = the headline ratio) and the baseline."""
    if context < 1:
        raise ValueError("context must be >= 1")
    results: list[ModelResult] = []
    for spec in models:
        if resolve_model(spec)[0] not in [r.key for r in results]:
            results.append(model_result(spec, context, kv_format, index_keys))
    base = resolve_model(baseline)[0]
    if base not in [r.key for r in results]:
        results.append(model_result(baseline, context, kv_format, index_keys))
    return Analysis(context=context, kv_format=kv_format, index_keys=index_keys, baseline=base,
                    results=results)


@dataclass(frozen=True)
class ClaimCheck:
    model: str
    quantity: str  # "flops" | "kv"
    claimed: float
    computed: float  # in the requested format
    by_format: dict[str, float]  # kv only: "bf16", "fp8+fp4idx", "fp8+fp8idx"

    @property
    def matches(self) -> bool:
        return abs(self.computed - self.claimed) <= MATCH_TOLERANCE + 1e-12


def claim_checks(kv_format: str = "fp8", index_keys: str = "fp4") -> list[ClaimCheck]:
    """DeepSeek's four published ratios, recomputed at 1M tokens against V3.2."""
    variants = {"fp8+fp4idx": ("fp8", "fp4"), "fp8+fp8idx": ("fp8", "fp8"),
                "bf16": ("bf16", "fp4")}
    runs = {name: analyze(list(CLAIMS), CLAIM_CONTEXT, CLAIM_BASELINE, fmt, idx)
            for name, (fmt, idx) in variants.items()}
    chosen = analyze(list(CLAIMS), CLAIM_CONTEXT, CLAIM_BASELINE, kv_format, index_keys)
    out = []
    for key, claim in CLAIMS.items():
        out.append(ClaimCheck(key, "flops", claim["flops"], chosen.flops_ratio(key), {}))
        out.append(ClaimCheck(key, "kv", claim["kv"], chosen.kv_ratio(key),
                              {n: a.kv_ratio(key) for n, a in runs.items()}))
    return out


ACCOUNTING = (
    "FLOPs: 2 per multiply-accumulate, matrix products only, one decode token at position N "
    "seeing N+1 tokens; counted: attention projections (MLA with W_UK/W_UV absorbed), router, "
    "top-k routed + shared experts (V3: dense FFN in layers 0-2), attention scores and values, "
    "indexer projections and scores over every visible key (V4: only once the visible "
    "entries outnumber index_topk; before that all are attended), V4 compressor projections, mHC "
    "maps, lm_head; not counted: elementwise ops, embedding lookup, MTP. KV: bytes one "
    "sequence holds (trunk layers; V4 includes its 128-token window and fp32 compressor state)."
)


def to_json(analysis: Analysis, checks: list[ClaimCheck] | None = None) -> dict[str, Any]:
    """The ``--json`` object: per model totals and breakdowns, ratios of the first model."""
    models: dict[str, Any] = {}
    for r in analysis.results:
        models[r.key] = {
            "name": r.name,
            "flops_per_token": r.flops_total,
            "kv_bytes_per_sequence": r.kv_total,
            "kv_bytes_per_token": r.kv_per_token,
            "kv_entry_bytes": {"main": r.entry[0], "indexer": r.entry[1]},
            "flops_breakdown": dict(r.flops),
            "kv_breakdown": dict(r.kv),
            "flops_ratio": analysis.flops_ratio(r.key),
            "kv_ratio": analysis.kv_ratio(r.key),
        }
    first = analysis.results[0].key
    out: dict[str, Any] = {
        "context": analysis.context,
        "kv_format": analysis.kv_format,
        "indexer_keys": analysis.index_keys,
        "baseline": analysis.baseline,
        "first_model": first,
        "flops_ratio": analysis.flops_ratio(first),
        "kv_ratio": analysis.kv_ratio(first),
        "models": models,
        "accounting": ACCOUNTING,
    }
    if checks is not None:
        out["claims"] = [
            {"model": c.model, "quantity": c.quantity, "context": CLAIM_CONTEXT,
             "baseline": CLAIM_BASELINE, "claimed": c.claimed, "computed": c.computed,
             "matches": c.matches, **({"computed_by_format": c.by_format} if c.by_format else {})}
            for c in checks
        ]
    return out
