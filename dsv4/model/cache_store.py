"""The cache-store interface of the attention: what a layer reads from and writes to its cache.

The model defines it; caches implement it structurally (they need not import this module):
dsv4.model.sequence_cache (unpaged, for `model(input_ids)`) and dsv4.cache.kv_cache (paged, for
the engine). Attention has two paths, each with its own pair of stores:

- Segment path (`Attention._attend`): B rows of one segment, consecutive positions from one
  shared `start_pos`, any number of tokens. Stores: `LayerStore` with one `CompressorStore` per
  compressor (main, and the indexer's on CSA layers). Implemented by SequenceCache's
  `LayerState` / `CompressorState` and by the engine's per-request `RequestView.layer(i)`.
- Batched decode path (`Attention.attend_rows`): R sequences with one new token each, each at
  its own position. Stores: `BatchedLayerStore` with `BatchedCompressorStore`s. Implemented by
  the engine's `DecodeGroup.layer(i)`.

Shapes: B / R rows, D the stored vector width (head_dim, or index_head_dim for indexer keys),
`width` the compressor's projected width (2D with CSA's overlap, else D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Decoder", "LayerStore", "CompressorStore", "BatchedLayerStore",
           "BatchedCompressorStore"]

# turns stored entry rows (possibly an encoded byte format) into compute-dtype vectors
Decoder = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class CompressorStore(Protocol):
    """One compressor's state and entries for the B rows of a segment."""

    def pending(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last `count` tokens of the unfinished window as (kv, score) [B, count, width];
        None when count is 0."""
        ...

    def set_pending(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        """Replace the unfinished window by kv, score [B, c, width] (c < ratio, may be 0)."""
        ...

    def previous(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CSA's last complete window (kv, score) [B, ratio, width]; read only from the second
        window on."""
        ...

    def set_previous(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        """Keep kv, score [B, ratio, width] as the last complete window."""
        ...

    def observe(self, start: int, kv: torch.Tensor, score: torch.Tensor) -> None:
        """Every row the segment pools or leaves pending, kv, score [B, n, width] at positions
        start.. (a window start: the pending rows first, then the segment's own). The paged
        store keeps what it needs from them: CSA's rows at the end of a cache block (prefix
        caching); others ignore the call."""
        ...

    def append(self, entries: torch.Tensor) -> None:
        """Store the segment's newly finished entries [B, n, D], in order after those stored."""
        ...

    def entry_slots(self, count: int) -> tuple[torch.Tensor, torch.Tensor, Decoder | None]:
        """(storage [B, S, ...], slots [count], decode): entry w of every row is
        storage[:, slots[w]], made a vector by decode (None: stored as vectors)."""
        ...


@runtime_checkable
class LayerStore(Protocol):
    """One layer's cache for the B rows of a segment: window KV and compressor stores."""

    @property
    def compressor(self) -> CompressorStore | None:
        """The main compressor (csa / hca layers); None on a window-only layer."""
        ...

    @property
    def indexer(self) -> CompressorStore | None:
        """The indexer's key compressor (csa layers); None elsewhere."""
        ...

    def window_history(self, count: int) -> torch.Tensor | None:
        """The `count` window vectors before the segment [B, count, D], oldest first; None when
        count is 0."""
        ...

    def save_window(self, kv: torch.Tensor, window: torch.Tensor) -> None:
        """Keep the segment's new window vectors kv [B, T, D]; `window` [B, h + T, D] is the
        history followed by kv (a store may keep its tail instead of writing kv)."""
        ...


@runtime_checkable
class BatchedCompressorStore(Protocol):
    """One compressor's state and entries for R decode rows, one token each. Rows of one
    sequence at consecutive positions (speculative decoding's verified drafts) lie in
    successive waves; every other row is in wave 0."""

    @property
    def num_entries(self) -> int:
        """Entries of the row with the most, counting those this token completes."""
        ...

    @property
    def num_waves(self) -> int:
        """How many waves the rows form (1 without drafts)."""
        ...

    def write_token(self, kv: torch.Tensor, score: torch.Tensor, wave: int) -> None:
        """Put the new token of each row of `wave` into its unfinished window (kv, score
        [R, width]: every row's; the store picks the wave's)."""
        ...

    def completing_rows(self, wave: int) -> torch.Tensor | None:
        """Rows [R_done] of `wave` whose window their token completes; None when none does."""
        ...

    def completed_windows(self, done: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kv, score [R_done, slots, dim] of the windows completed by rows `done`, in the
        pooling layout (CSA: the previous window's first halves, then this one's second)."""
        ...

    def append_completed(self, done: torch.Tensor, entries: torch.Tensor, wave: int) -> None:
        """Store the new entry [R_done, D] of each row in `done` (rows of `wave`)."""
        ...

    def entry_slots(self) -> tuple[torch.Tensor, torch.Tensor, Decoder | None]:
        """(storage [1, S, ...], slots [R, E] with -1 where a row has no entry, decode)."""
        ...


@runtime_checkable
class BatchedLayerStore(Protocol):
    """One layer's cache for R decode rows: window KV and compressor stores."""

    @property
    def compressor(self) -> BatchedCompressorStore | None:
        """The main compressor (csa / hca layers); None on a window-only layer."""
        ...

    @property
    def indexer(self) -> BatchedCompressorStore | None:
        """The indexer's key compressor (csa layers); None elsewhere."""
        ...

    def window(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new vector kv [R, D]; return its window [R, W, D] (oldest first, the
        new token last) and which of those positions exist [R, W]."""
        ...

    def window_entries(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                        Decoder | None]:
        """Store each row's new vector kv [R, D]; return the window where it lies, for a kernel
        that reads the cache in place: (storage [1, S, ...], slots [R, W] oldest first, -1
        where the position does not exist, decode). The new token is read back as stored."""
        ...
