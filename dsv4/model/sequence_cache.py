"""SequenceCache: the simple, unpaged per-sequence decode state of the model (architecture.md 3).

One `LayerState` per layer: the last `sliding_window - 1` window KV vectors, and for compressed
layers a `CompressorState` (tokens of the unfinished window, the previous complete window for
CSA's overlap, all compressed entries so far; main, and indexer keys on CSA layers). A batch of B
sequences shares one position counter, so this is the cache for `model(input_ids)` and
token-by-token tests. LayerState and CompressorState implement the Segment-path stores of
dsv4.model.cache_store (`LayerStore`, `CompressorStore`); the paged engine cache
(dsv4.cache.kv_cache) implements the same protocols over block tables, so the attention code is
shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.config import ModelConfig
from dsv4.model.cache_store import Decoder

__all__ = ["SequenceCache", "LayerState", "CompressorState"]


@dataclass
class CompressorState:
    """Partial-window and output state of one compressor (main or indexer)."""

    ratio: int
    width: int  # coff * D: the projected width (2D with overlap)
    out_dim: int  # D
    pending_kv: torch.Tensor | None = None  # [B, c, width] tokens of the unfinished window
    pending_score: torch.Tensor | None = None  # [B, c, width] gate logits incl. position bias
    prev_kv: torch.Tensor | None = None  # [B, ratio, width] last complete window (overlap only)
    prev_score: torch.Tensor | None = None
    entries: torch.Tensor | None = None  # [B, capacity, D] compressed entries
    num_entries: int = 0

    def pending(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if count == 0 or self.pending_kv is None:
            return None
        return self.pending_kv[:, -count:], self.pending_score[:, -count:]

    def set_pending(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        self.pending_kv, self.pending_score = kv, score

    def previous(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.prev_kv is None else (self.prev_kv, self.prev_score)

    def set_previous(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        self.prev_kv, self.prev_score = kv, score

    def observe(self, start: int, kv: torch.Tensor, score: torch.Tensor) -> None:
        """Nothing to keep: a sequence cache has no prefix cache and no speculation."""

    def entry_slots(self, count: int) -> tuple[torch.Tensor, torch.Tensor, Decoder | None]:
        slots = torch.arange(count, device=self.entries.device)
        return self.entries, slots, None  # stored as computed: nothing to decode

    def append(self, entries: torch.Tensor) -> None:
        """Append [B, n, D] entries, growing capacity geometrically (amortised O(1))."""
        n = entries.shape[1]
        if n == 0:
            return
        need = self.num_entries + n
        if self.entries is None or self.entries.shape[1] < need:
            cap = max(need, 2 * (0 if self.entries is None else self.entries.shape[1]), 16)
            grown = entries.new_zeros(entries.shape[0], cap, entries.shape[2])
            if self.entries is not None:
                grown[:, : self.num_entries] = self.entries[:, : self.num_entries]
            self.entries = grown
        self.entries[:, self.num_entries:need] = entries
        self.num_entries = need


@dataclass
class LayerState:
    window: torch.Tensor | None = None  # [B, <= window-1, head_dim] most recent KV, oldest first
    window_size: int = 128
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def window_history(self, count: int) -> torch.Tensor | None:
        if count == 0 or self.window is None:
            return None
        return self.window[:, -count:]

    def save_window(self, kv: torch.Tensor, window: torch.Tensor) -> None:
        """Keep the last window_size - 1 vectors of `window` (history then the new chunk)."""
        keep = min(self.window_size - 1, window.shape[1])
        self.window = window[:, window.shape[1] - keep:]


@dataclass
class SequenceCache:
    config: ModelConfig
    layers: list[LayerState] = field(default_factory=list)
    num_tokens: int = 0  # tokens already processed (= position of the next token)

    @classmethod
    def empty(cls, config: ModelConfig, num_layers: int | None = None) -> SequenceCache:
        layers = []
        ratios = list(config.compress_ratios)
        ratios += [0] * ((num_layers or len(ratios)) - len(ratios))
        for ratio in ratios[: num_layers or len(ratios)]:
            st = LayerState(window_size=config.sliding_window)
            if ratio:
                coff = 2 if ratio == 4 else 1
                st.compressor = CompressorState(ratio, coff * config.head_dim, config.head_dim)
                if ratio == 4:
                    st.indexer = CompressorState(
                        ratio, coff * config.index_head_dim, config.index_head_dim)
            layers.append(st)
        return cls(config, layers)

    @classmethod
    def synthetic(cls, config: ModelConfig, context_len: int, batch: int = 1,
                  device: str | torch.device = "meta",
                  dtype: torch.dtype = torch.float32) -> SequenceCache:
        """A cache shaped as if `context_len` tokens had been processed (zeros, or shapes only on
        the meta device): for FLOP counting and memory sizing without running a prefill."""
        cache = cls.empty(config)
        w = min(context_len, config.sliding_window - 1)
        for st in cache.layers:
            st.window = torch.zeros(batch, w, config.head_dim, device=device, dtype=dtype)
            for cs in (st.compressor, st.indexer):
                if cs is None:
                    continue
                n_entries, c = divmod(context_len, cs.ratio)
                cs.entries = torch.zeros(batch, n_entries, cs.out_dim, device=device, dtype=dtype)
                cs.num_entries = n_entries
                cs.pending_kv = torch.zeros(batch, c, cs.width, device=device)
                cs.pending_score = torch.zeros(batch, c, cs.width, device=device)
                if cs.ratio == 4 and n_entries:
                    cs.prev_kv = torch.zeros(batch, cs.ratio, cs.width, device=device)
                    cs.prev_score = torch.zeros(batch, cs.ratio, cs.width, device=device)
        cache.num_tokens = context_len
        return cache
