"""KV-cache bytes per token and per sequence, for V4 and the MLA baselines, by storage format.

Formats (docs/architecture.md 3.3, docs/performance.md 1-2): ``bf16`` is the reference storage
(V4 entry 1024 B, indexer key 256 B; MLA entry 1152 B). ``fp8`` is the deployment format: V4
entries as FlashMLA ``fp8_ds_mla`` (448 e4m3 + 64 bf16 RoPE dims + 7 ue8m0 scales + 1 pad =
584 B) with FP4 (68 B, the default) or FP8 (132 B) indexer keys; V3/V3.2 FP8 MLA 656 B (512
e4m3 + 4 fp32 scales + 64 bf16) and FP8 indexer key 132 B. V4 also keeps a 128-token window per
layer and fixed fp32 compressor state; both are counted per sequence.
"""

from __future__ import annotations

from dsv4.analysis.baselines import MLAConfig
from dsv4.analysis.flops import AnyConfig
from dsv4.cache.spec import entry_bytes as v4_entry_bytes
from dsv4.cache.spec import index_entry_bytes, state_bytes
from dsv4.config import ModelConfig

__all__ = [
    "INDEXER_KEY_FORMATS",
    "KV_FORMATS",
    "entry_bytes",
    "kv_bytes_per_sequence",
    "kv_bytes_per_token",
]

KV_FORMATS = ("bf16", "fp8")
INDEXER_KEY_FORMATS = ("fp4", "fp8")  # V4 with fp8 entries; V3.2 fp8 always uses FP8 keys


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def entry_bytes(cfg: AnyConfig, fmt: str, index_keys: str = "fp4") -> tuple[int, int]:
    """(bytes of one main KV entry, bytes of one indexer key; 0 when there is no indexer)."""
    if fmt not in KV_FORMATS:
        raise ValueError(f"unknown kv format {fmt!r} (choose from {', '.join(KV_FORMATS)})")
    if index_keys not in INDEXER_KEY_FORMATS:
        raise ValueError(f"unknown indexer key format {index_keys!r}")
    if isinstance(cfg, MLAConfig):
        lat, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        ci = cfg.index_head_dim if cfg.has_indexer else 0
        if fmt == "bf16":
            return 2 * (lat + rope), 2 * ci
        # e4m3 latent + one fp32 scale per 128 + bf16 rope; FP8 key + one fp32 scale
        return lat + 4 * _ceil_div(lat, 128) + 2 * rope, (ci + 4) if ci else 0
    # V4: the engine's own cache formats (dsv4.cache.spec), so both count the same bytes
    main = v4_entry_bytes(fmt, cfg.head_dim, cfg.qk_rope_head_dim)
    return main, index_entry_bytes(index_keys if fmt == "fp8" else fmt, cfg.index_head_dim)


def _v4_layer_counts(cfg: ModelConfig) -> tuple[int, dict[int, int]]:
    n_csa = sum(1 for r in cfg.compress_ratios if r == 4)
    hca: dict[int, int] = {}
    for r in cfg.compress_ratios:
        if r > 4:
            hca[r] = hca.get(r, 0) + 1
    return n_csa, hca


def kv_bytes_per_token(cfg: AnyConfig, fmt: str, index_keys: str = "fp4") -> float:
    """Asymptotic growth of one sequence's cache per additional token (window, state excluded)."""
    main, idx = entry_bytes(cfg, fmt, index_keys)
    if isinstance(cfg, MLAConfig):
        return float(cfg.num_hidden_layers * (main + idx))
    n_csa, hca = _v4_layer_counts(cfg)
    return n_csa * (main + idx) / 4 + sum(n * main / r for r, n in hca.items())


def kv_bytes_per_sequence(cfg: AnyConfig, context: int, fmt: str,
                          index_keys: str = "fp4") -> dict[str, int]:
    """Bytes one sequence holds after ``context`` tokens, by part (trunk layers; MTP excluded).

    V4: ``window`` (last <= 128 entries per layer), ``compressed`` (CSA N//4 and HCA N//128
    entries), ``indexer`` (CSA keys), ``state`` (fp32 compressor buffers, fixed size).
    MLA: ``latent`` (one entry per token per layer) and ``indexer`` (V3.2).
    """
    main, idx = entry_bytes(cfg, fmt, index_keys)
    if isinstance(cfg, MLAConfig):
        out = {"latent": cfg.num_hidden_layers * context * main}
        if idx:
            out["indexer"] = cfg.num_hidden_layers * context * idx
        return out
    window = cfg.num_hidden_layers * min(cfg.sliding_window, context) * main
    compressed = indexer = state = 0
    c, ci = cfg.head_dim, cfg.index_head_dim
    for r in cfg.compress_ratios:
        if r == 0:
            continue
        compressed += (context // r) * main
        state += state_bytes(r, c)  # fp32 kv + score buffers of the unfinished window(s)
        if r == 4:
            indexer += (context // r) * idx
            state += state_bytes(r, ci)
    return {"window": window, "compressed": compressed, "indexer": indexer, "state": state}
