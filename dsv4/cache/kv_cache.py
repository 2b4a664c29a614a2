"""KVCache: the paged cache storage (tensors), allocated once, addressed by block tables.

Layout, per kind, one tensor over all layers of that kind (B = block_size, r = ratio):

    swa       [num_layers (+ MTP), num_swa_blocks, B, D] every layer's window KV, by token
    csa       [n_csa, num_csa_blocks, B/4, D]          main compressed entries
    csa_index [n_csa, num_csa_blocks, B/4, D_index]    indexer keys
    hca       [n_hca, num_hca_blocks, B/r, D]
    states    [n_layers_of_kind, num_slots, rows, width] x (kv, score), state_dtype: the unfinished
              window (rows [ratio:] with CSA overlap, else [0:]) and CSA's previous window
              (rows [0:ratio])
    boundaries [n_csa, num_swa_blocks, 4, D or D_index] x (kv, score), with prefix caching only:
              the first halves of CSA's previous-window rows at the end of each swa block
              (written when the window ending there completes; loaded into the state slot of
              a request that starts after a cached prefix ending there)

The attention reads and writes through the store protocols of dsv4.model.cache_store, which
these classes implement structurally (the cache never imports the model): `RequestView` (one
request in one step) hands out per-layer `LayerStore`s for the Segment path, like
SequenceCache's; `DecodeGroup` (dsv4.cache.decode_group: the step's one-token rows) hands out
`BatchedLayerStore`s for the batched decode path. Both are built once per step and turn block
tables into slot tensors once per step (cached by position range), not once per layer.
Accounting (which block is whose) lives in BlockManager; this module only stores and gathers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.kv_format import EntryFormat, entry_format
from dsv4.cache.spec import DEFAULT_INDEX_CACHE_DTYPE
from dsv4.config import ModelConfig
from dsv4.ops import OPS

__all__ = ["KVCache", "RequestView"]

_STATE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}

# stored entry rows -> compute-dtype vectors (dsv4.model.cache_store.Decoder)
_Decoder = Callable[[torch.Tensor], torch.Tensor]
_Owner = TypeVar("_Owner")  # RequestView or DecodeGroup
_Store = TypeVar("_Store")  # _CompressorStore or _BatchedCompressorStore


def _widened(state: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Compressor state for pooling: bf16 state is pooled in fp32, wider dtypes as stored (a copy
    unless `copy` is False, for a tensor that is one already)."""
    if state.dtype == torch.bfloat16:
        return state.float()
    return state.clone() if copy else state


class KVCache:
    def __init__(self, config: ModelConfig, block_manager: BlockManager,
                 device: torch.device | str, compute_dtype: torch.dtype,
                 kv_cache_dtype: str = "fp32", index_cache_dtype: str | None = None,
                 state_dtype: str = "fp32") -> None:
        self.config, self.block_size = config, block_manager.block_size
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        d, di, bs = config.head_dim, config.index_head_dim, self.block_size
        rope = config.qk_rope_head_dim
        main = entry_format(kv_cache_dtype, d, rope)
        key = entry_format(index_cache_dtype or DEFAULT_INDEX_CACHE_DTYPE[kv_cache_dtype], di, rope,
                           key=True)
        self.formats = {"swa": main, "csa": main, "hca": main, "csa_index": key}
        kinds = config.layer_kinds
        self.kind_index: list[int] = []  # layer -> index among the layers of its kind
        counts = {"swa": 0, "csa": 0, "hca": 0}
        for kind in kinds:
            self.kind_index.append(counts[kind])
            counts[kind] += 1
        sdt = _STATE_TORCH_DTYPES[state_dtype]
        pools = block_manager.pools
        slots = block_manager.state_pool.num_blocks

        def entries(fmt: EntryFormat, *shape: int) -> torch.Tensor:
            return torch.zeros(*shape, fmt.nbytes, dtype=fmt.storage_dtype, device=self.device)

        def state(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.zeros(*shape, dtype=sdt, device=self.device),
                    torch.zeros(*shape, dtype=sdt, device=self.device))

        # the trunk's layers, then the MTP block's (speculative decoding) when the swa spec has it
        num_window_layers = len(block_manager.specs["swa"].layer_ids)
        self.swa = entries(main, num_window_layers, pools["swa"].num_blocks, bs)
        self.entries: dict[str, torch.Tensor] = {}
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if counts["csa"]:
            n, blocks = counts["csa"], pools["csa"].num_blocks
            self.entries["csa"] = entries(main, n, blocks, bs // 4)
            self.entries["csa_index"] = entries(key, n, blocks, bs // 4)
            self.states["csa"] = state(n, slots, 8, 2 * d)
            self.states["csa_index"] = state(n, slots, 8, 2 * di)
        if counts["hca"]:
            r, n, blocks = config.hca_ratio, counts["hca"], pools["hca"].num_blocks
            self.entries["hca"] = entries(main, n, blocks, bs // r)
            self.states["hca"] = state(n, slots, r, d)
        self.boundaries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if block_manager.specs["swa"].boundary_bytes and counts["csa"]:
            n, blocks = counts["csa"], pools["swa"].num_blocks
            self.boundaries["csa"] = state(n, blocks, 4, d)
            self.boundaries["csa_index"] = state(n, blocks, 4, di)

    def encode(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        return self.formats[kind].encode(x)

    def write(self, kind: str, flat: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Encode x [n, D] as `kind` entries into rows `slots` of flat storage (the kv_write op)."""
        OPS.kv_write(flat, slots, x, self.formats[kind])

    def decoder(self, kind: str) -> _Decoder | None:
        """How to turn stored rows of `kind` into compute-dtype vectors (None: as they are)."""
        fmt = self.formats[kind]
        if not fmt.encoded:
            return None
        # a partial, not a lambda: a kernel reads the format from it (decode.func.__self__)
        return functools.partial(fmt.decode, dtype=self.compute_dtype)

    def read(self, kind: str, raw: torch.Tensor) -> torch.Tensor:
        decode = self.decoder(kind)
        return raw if decode is None else decode(raw)

    def window_flat(self, layer: int) -> torch.Tensor:
        return self.swa[layer].view(-1, self.swa.shape[-1])

    def compressor_stores(self, layer: int, owner: _Owner,
                          store: Callable[[_Owner, str, int, int], _Store]
                          ) -> tuple[_Store | None, _Store | None]:
        """(main, indexer) compressor stores of `layer` built as store(owner, key, index, ratio);
        None where the layer has none (an MTP layer, after the trunk's, has none)."""
        if layer >= len(self.kind_index):
            return None, None
        kind, k = self.config.layer_kinds[layer], self.kind_index[layer]
        if kind == "csa":
            return store(owner, "csa", k, 4), store(owner, "csa_index", k, 4)
        if kind == "hca":
            return store(owner, "hca", k, self.config.hca_ratio), None
        return None, None

    def memory_bytes(self) -> int:
        tensors = [self.swa, *self.entries.values()]
        tensors += [t for pairs in (self.states, self.boundaries) for pair in pairs.values()
                    for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def load_boundaries(self, slots: list[int], blocks: list[int]) -> None:
        """Copy the CSA state kept at the end of swa block blocks[i] into state slot slots[i]
        (its previous-window rows): a request that starts after a cached prefix ending there
        then pools its next window as if it had computed the prefix itself. Nothing else of the
        state is read at a block boundary (no window is unfinished there)."""
        if not self.boundaries or not slots:
            return
        s = torch.tensor(slots, dtype=torch.long, device=self.device)
        b = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for key, kept in self.boundaries.items():
            dim = kept[0].shape[-1]
            for state, rows in zip(self.states[key], kept):
                state[:, s, :4, :dim] = rows[:, b]

    def keep_boundaries(self, key: str, layer: int, blocks: torch.Tensor, kv: torch.Tensor,
                        score: torch.Tensor) -> None:
        """Keep the previous-window rows kv, score [R, 4, width >= dim] of CSA compressor `key`
        in `layer` as the boundary state of swa blocks [R] (no-op without a prefix cache)."""
        kept = self.boundaries.get(key)
        if kept is None:
            return
        dim = kept[0].shape[-1]
        kept[0][layer, blocks] = kv[:, :, :dim].to(kept[0].dtype)
        kept[1][layer, blocks] = score[:, :, :dim].to(kept[1].dtype)


def _slots(table: torch.Tensor, ids: torch.Tensor, per_block: int) -> torch.Tensor:
    """Logical entry ids -> flat slot ids in [num_blocks * per_block)."""
    return table[ids // per_block] * per_block + ids % per_block


def _kind(key: str) -> str:
    """The block kind of a compressed store: csa_index lives in csa's blocks."""
    return "csa" if key.startswith("csa") else "hca"


def _compressed_storage(cache: KVCache, tables: dict[str, torch.Tensor], key: str, layer: int
                        ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(flat entry storage [blocks * per_block, D or bytes], per_block, block table) of one
    compressed kind ("csa", "csa_index" or "hca") in one layer; csa_index uses csa's blocks."""
    storage = cache.entries[key][layer]  # [blocks, per_block, D or bytes]
    flat = storage.view(-1, storage.shape[-1])
    return flat, storage.shape[1], tables[_kind(key)]


class _CompressorStore:
    """One request's compressor (main or indexer) of one layer in the paged cache."""

    def __init__(self, view: RequestView, key: str, layer: int, ratio: int) -> None:
        self.view, self.ratio, self.layer = view, ratio, layer
        kv_state, score_state = view.cache.states[key]
        self.kv, self.score = kv_state[layer, view.slot], score_state[layer, view.slot]
        self.overlap, self.key = ratio == 4, key
        self.flat, self.per_block, self.table = _compressed_storage(view.cache, view.tables, key,
                                                                    layer)

    def pending(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if count == 0:
            return None
        off = self.ratio if self.overlap else 0
        return (_widened(self.kv[off:off + count].unsqueeze(0)),
                _widened(self.score[off:off + count].unsqueeze(0)))

    def set_pending(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        off, n = (self.ratio if self.overlap else 0), kv.shape[1]
        self.kv[off:off + n] = kv[0]
        self.score[off:off + n] = score[0]

    def previous(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        m = self.ratio
        return _widened(self.kv[:m].unsqueeze(0)), _widened(self.score[:m].unsqueeze(0))

    def set_previous(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        self.kv[: self.ratio] = kv[0]
        self.score[: self.ratio] = score[0]

    def observe(self, start: int, kv: torch.Tensor, score: torch.Tensor) -> None:
        view, cache, m = self.view, self.view.cache, self.ratio
        if self.key not in cache.boundaries:
            return
        n_win = kv.shape[1] // m
        ends = view.block_end_windows(start // m, n_win, m)
        if ends is None:
            return
        index, blocks = ends
        windows = kv[0, :n_win * m].unflatten(0, (n_win, m))
        scores = score[0, :n_win * m].unflatten(0, (n_win, m))
        cache.keep_boundaries(self.key, self.layer, blocks, windows[index], scores[index])

    def append(self, entries: torch.Tensor) -> None:
        slots = self.view.entry_slots(_kind(self.key), self.per_block,
                                      self.view.start_pos // self.ratio, entries.shape[1])
        self.view.cache.write(self.key, self.flat, slots, entries[0])

    def entry_slots(self, count: int) -> tuple[torch.Tensor, torch.Tensor, _Decoder | None]:
        return (self.flat.unsqueeze(0),
                self.view.entry_slots(_kind(self.key), self.per_block, 0, count),
                self.view.cache.decoder(self.key))


class _LayerStore:
    """One request's cache for one layer: window, compressor and indexer stores."""

    def __init__(self, view: RequestView, layer: int) -> None:
        self.view, self.layer = view, layer
        self.window_flat = view.cache.window_flat(layer)
        self.compressor, self.indexer = view.cache.compressor_stores(layer, view, _CompressorStore)

    def window_history(self, count: int) -> torch.Tensor | None:
        if count == 0:
            return None
        start = self.view.start_pos
        raw = self.window_flat[self.view.window_slots(start - count, start)]
        return self.view.cache.read("swa", raw).unsqueeze(0)

    def save_window(self, kv: torch.Tensor, window: torch.Tensor) -> None:
        """Write the new chunk's vectors into their blocks (`window` is not needed here)."""
        start = self.view.start_pos
        slots = self.view.window_slots(start, start + kv.shape[1])
        self.view.cache.write("swa", self.window_flat, slots, kv[0])


class RequestView:
    """One request of one step: its block tables as device tensors and its state slot. Slot
    tensors are built on first use and kept for the step: every layer (and the indexer keys of
    csa layers) reads the same positions through the same tables."""

    def __init__(self, cache: KVCache, tables: dict[str, list[int]], swa_offset: int,
                 slot: int, start_pos: int) -> None:
        self.cache, self.swa_offset, self.slot, self.start_pos = cache, swa_offset, slot, start_pos
        self.tables = {k: torch.tensor(v, dtype=torch.long, device=cache.device)
                       for k, v in tables.items()}
        self._window: dict[tuple[int, int], torch.Tensor] = {}
        self._entries: dict[tuple[str, int, int, int], torch.Tensor] = {}
        self._block_ends: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def window_slots(self, begin: int, end: int) -> torch.Tensor:
        """Flat swa slots of positions [begin, end)."""
        key = (begin, end)
        if key not in self._window:
            bs = self.cache.block_size
            pos = torch.arange(begin, end, device=self.cache.device)
            self._window[key] = self.tables["swa"][pos // bs - self.swa_offset] * bs + pos % bs
        return self._window[key]

    def entry_slots(self, kind: str, per_block: int, first: int, count: int) -> torch.Tensor:
        """Flat slots of compressed entries [first, first + count) of `kind` ("csa" / "hca")."""
        key = (kind, per_block, first, count)
        if key not in self._entries:
            ids = torch.arange(first, first + count, device=self.cache.device)
            self._entries[key] = _slots(self.tables[kind], ids, per_block)
        return self._entries[key]

    def block_end_windows(self, first: int, count: int, ratio: int
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Of windows first .. first + count - 1 (``ratio`` tokens each), those that end a cache
        block: (their index among the count, the swa block they end); None when none does.
        The same for every CSA layer (and the indexer keys), so built once a step."""
        key = (first, count, ratio)
        if key not in self._block_ends:
            per_block = self.cache.block_size // ratio  # windows per block
            # windows i with (first + i + 1) % per_block == 0: every per_block-th
            picks = list(range(-(first + 1) % per_block, count, per_block))
            found = None
            if picks:
                logical = [(first + i + 1) // per_block - 1 for i in picks]
                dev = self.cache.device
                found = (torch.tensor(picks, device=dev),
                         self.tables["swa"][torch.tensor(logical, device=dev) - self.swa_offset])
            self._block_ends[key] = found
        return self._block_ends[key]

    def layer(self, layer: int) -> _LayerStore:
        return _LayerStore(self, layer)
