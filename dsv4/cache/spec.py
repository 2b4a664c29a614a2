"""CacheSpec: what one cache kind (swa / csa / hca) stores per layer, and how many bytes.

The three kinds (architecture.md 3.1, design-anchors 6.1): ``swa`` is the raw K=V latent of the
last ``sliding_window`` tokens on *every* trunk layer; ``csa`` is one compressed entry per 4 source
tokens plus one indexer key, on CSA layers; ``hca`` is one compressed entry per ``hca_ratio``
tokens on HCA layers. Compressed kinds also own a fixed per-request fp32 compressor state.
Sizes follow architecture.md 3.3 (FP8 "fp8_ds_mla" entry 584 B, FP4 indexer 68 B, ...).
This module is the one type that scheduler and model runner share; it allocates nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from dsv4.config import ModelConfig

__all__ = [
    "CACHE_KINDS",
    "CacheKind",
    "CacheSpec",
    "boundary_row_bytes",
    "build_cache_specs",
    "entry_bytes",
    "index_entry_bytes",
    "kv_bytes_per_seq",
    "kv_bytes_per_token",
    "state_bytes_per_seq",
]

CacheKind = str  # "swa" | "csa" | "hca"
CACHE_KINDS: tuple[CacheKind, ...] = ("swa", "csa", "hca")
KV_CACHE_DTYPES = ("bf16", "fp8", "fp32", "fp64")
INDEX_CACHE_DTYPES = ("fp4", "fp8", "bf16", "fp32", "fp64")
STATE_DTYPES = ("fp32", "bf16", "fp64")
_DTYPE_BYTES = {"bf16": 2, "fp32": 4, "fp64": 8}
# default indexer-key format for each main format: FP8 entries pair with FP4 keys, which is what
# the reference emulates (architecture.md 3.3); plain formats keep the same dtype.
DEFAULT_INDEX_CACHE_DTYPE = {"fp8": "fp4", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}


def entry_bytes(kv_cache_dtype: str, head_dim: int, rope_dim: int) -> int:
    """Bytes of one main / window entry (one token or one compressed entry, one layer).

    "fp8": nope dims as e4m3 + rope dims as bf16 + one ue8m0 scale per 64 nope dims, padded to
    8 bytes (448 + 128 + 7 + 1 = 584 for V4). "bf16" / "fp32": plain ``head_dim`` values.
    """
    if kv_cache_dtype == "fp8":
        nope = head_dim - rope_dim
        raw = nope + 2 * rope_dim + math.ceil(nope / 64)
        return -(-raw // 8) * 8
    if kv_cache_dtype in _DTYPE_BYTES:
        return head_dim * _DTYPE_BYTES[kv_cache_dtype]
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def index_entry_bytes(index_cache_dtype: str, index_head_dim: int) -> int:
    """Bytes of one indexer key: "fp4" = d/2 + one e8m0 scale per 32 dims (68 B for d = 128),
    "fp8" = d + one fp32 scale (132 B), "bf16" / "fp32" plain."""
    if index_cache_dtype == "fp4":
        return index_head_dim // 2 + math.ceil(index_head_dim / 32)
    if index_cache_dtype == "fp8":
        return index_head_dim + 4
    if index_cache_dtype in _DTYPE_BYTES:
        return index_head_dim * _DTYPE_BYTES[index_cache_dtype]
    raise ValueError(
        f"index_cache_dtype must be one of {INDEX_CACHE_DTYPES}, got {index_cache_dtype!r}"
    )


def state_bytes(ratio: int, dim: int, state_dtype: str = "fp32") -> int:
    """Compressor state of one compressor of one layer for one request (kv + score buffers)."""
    # [REF] kv_state / score_state: [coff * ratio, coff * dim] each; coff = 2 when windows overlap
    # (ratio 4: previous window's A-halves + current window), else 1.
    coff = 2 if ratio == 4 else 1
    return 2 * (coff * ratio) * (coff * dim) * _DTYPE_BYTES[state_dtype]


def boundary_row_bytes(config: ModelConfig, state_dtype: str = "fp32") -> int:
    """CSA's previous window at a block boundary, one CSA layer: the first halves (the only part
    the next window's pooling reads) of 4 kv and 4 score rows, main and indexer compressor."""
    return 2 * 4 * (config.head_dim + config.index_head_dim) * _DTYPE_BYTES[state_dtype]


@dataclass(frozen=True)
class CacheSpec:
    """One cache kind: which layers hold it and the bytes of its entries and states.

    Entries: ``swa`` keeps the last ``window`` tokens (one entry per token); ``csa`` / ``hca``
    keep one entry per ``ratio`` source tokens for the whole history. Blocks are measured in
    source tokens, so a block of ``block_size`` tokens holds ``block_size // ratio`` entries.
    """

    kind: CacheKind  # "swa" | "csa" | "hca"
    ratio: int  # source tokens per entry: 1 (swa), 4 (csa), hca_ratio (hca)
    layer_ids: tuple[int, ...]  # layers with this cache (swa: every trunk layer, + MTP if asked)
    entry_bytes: int  # one main / window entry of one layer (K=V latent)
    index_entry_bytes: int  # one indexer key of one layer (csa only, else 0)
    state_bytes: int  # compressor state of one layer for one request (main + indexer), fixed
    window: int  # swa: sliding window in tokens; compressed kinds keep everything (0)
    kv_cache_dtype: str
    index_cache_dtype: str | None  # csa only
    state_dtype: str | None  # compressed kinds only
    # swa with prefix caching: CSA's previous-window rows at the end of each block, all CSA
    # layers (main + indexer), kept with the block so a cached prefix can end there
    boundary_bytes: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def bytes_per_entry(self) -> int:
        """Main + indexer bytes of one entry, summed over this kind's layers."""
        return self.num_layers * (self.entry_bytes + self.index_entry_bytes)

    def entries_per_block(self, block_size: int) -> int:
        if block_size % self.ratio:
            raise ValueError(f"block_size {block_size} is not a multiple of {self.kind} ratio "
                             f"{self.ratio}")
        return block_size // self.ratio

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one block (``block_size`` source tokens) over all layers of this kind."""
        return self.entries_per_block(block_size) * self.bytes_per_entry + self.boundary_bytes

    def num_entries(self, num_tokens: int) -> int:
        """Live entries after ``num_tokens`` tokens: the window for swa, complete windows else."""
        if self.kind == "swa":
            return min(num_tokens, self.window)
        return num_tokens // self.ratio

    def bytes_per_token(self) -> float:
        """Asymptotic growth per source token (the window and states are constant)."""
        return 0.0 if self.kind == "swa" else self.bytes_per_entry / self.ratio

    def seq_bytes(self, num_tokens: int) -> int:
        """Entry bytes (main + indexer, all layers) of one sequence of ``num_tokens`` tokens."""
        return self.num_entries(num_tokens) * self.bytes_per_entry

    def seqstate_bytes(self) -> int:
        """Fixed compressor-state bytes of one sequence, all layers of this kind."""
        return self.num_layers * self.state_bytes


def build_cache_specs(
    config: ModelConfig,
    kv_cache_dtype: str = "bf16",
    index_cache_dtype: str | None = None,
    state_dtype: str = "fp32",
    num_mtp_layers: int = 0,
    prefix_caching: bool = False,
) -> dict[CacheKind, CacheSpec]:
    """The cache specs of a model, keyed by kind; kinds with no layers are left out (swa is
    always there). ``num_mtp_layers`` adds the sliding-window-only MTP layers (ids after the
    trunk) to the swa kind, for speculative decoding; architecture.md 3.3 counts the trunk only.
    ``prefix_caching`` gives each swa block room for CSA's state at its end (boundary_bytes)."""
    if index_cache_dtype is None:
        index_cache_dtype = DEFAULT_INDEX_CACHE_DTYPE.get(kv_cache_dtype, "bf16")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    if config.sliding_window <= 0:
        raise ValueError("sliding_window must be positive")
    main = entry_bytes(kv_cache_dtype, config.head_dim, config.qk_rope_head_dim)
    index = index_entry_bytes(index_cache_dtype, config.index_head_dim)
    n = config.num_hidden_layers
    kinds = config.layer_kinds
    boundary = 0
    if prefix_caching:
        boundary = kinds.count("csa") * boundary_row_bytes(config, state_dtype)
    specs: dict[CacheKind, CacheSpec] = {
        "swa": CacheSpec(
            kind="swa", ratio=1, layer_ids=tuple(range(n + num_mtp_layers)), entry_bytes=main,
            index_entry_bytes=0, state_bytes=0, window=config.sliding_window,
            kv_cache_dtype=kv_cache_dtype, index_cache_dtype=None, state_dtype=None,
            boundary_bytes=boundary,
        )
    }
    for kind in ("csa", "hca"):
        layer_ids = tuple(i for i in range(n) if kinds[i] == kind)
        if not layer_ids:
            continue
        ratios = {config.compress_ratios[i] for i in layer_ids}
        if len(ratios) != 1:
            raise ValueError(f"{kind} layers have different compress ratios: {sorted(ratios)}")
        ratio = ratios.pop()
        state = state_bytes(ratio, config.head_dim, state_dtype)
        if kind == "csa":
            state += state_bytes(ratio, config.index_head_dim, state_dtype)
        specs[kind] = CacheSpec(
            kind=kind, ratio=ratio, layer_ids=layer_ids, entry_bytes=main,
            index_entry_bytes=index if kind == "csa" else 0, state_bytes=state, window=0,
            kv_cache_dtype=kv_cache_dtype,
            index_cache_dtype=index_cache_dtype if kind == "csa" else None,
            state_dtype=state_dtype,
        )
    return specs


def kv_bytes_per_token(specs: Mapping[CacheKind, CacheSpec]) -> float:
    """Asymptotic KV bytes per source token of the whole model (compressed entries + indexer)."""
    return sum(spec.bytes_per_token() for spec in specs.values())


def kv_bytes_per_seq(specs: Mapping[CacheKind, CacheSpec], num_tokens: int) -> int:
    """KV bytes of one sequence of ``num_tokens`` tokens: compressed entries + indexer keys +
    sliding window, without compressor states (see :func:`state_bytes_per_seq`)."""
    return sum(spec.seq_bytes(num_tokens) for spec in specs.values())


def state_bytes_per_seq(specs: Mapping[CacheKind, CacheSpec]) -> int:
    """Fixed compressor-state bytes of one sequence (independent of its length)."""
    return sum(spec.seqstate_bytes() for spec in specs.values())
