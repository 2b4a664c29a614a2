"""DecodeGroup: a step's one-token rows in the paged cache, served together (vectorized).

The attention's DecodeRows path reads and writes through the stores handed out here
(`BatchedLayerStore` and `BatchedCompressorStore` of dsv4.model.cache_store, implemented
structurally): per-row block tables padded into matrices, one state slot and one position per
row, slot tensors built once per step and shared by every layer. The storage is `KVCache`'s
(dsv4.cache.kv_cache), like `RequestView`'s for the per-request Segment path.
"""

from __future__ import annotations

import torch

from dsv4.cache.kv_cache import KVCache, _compressed_storage, _Decoder, _kind, _widened

__all__ = ["DecodeGroup"]


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long,
                        device=device)


class DecodeGroup:
    """R requests with one new token each in this step, served together (vectorized) by the
    attention's DecodeRows path: per-row block tables padded into matrices, one state slot and
    one position per row."""

    def __init__(self, cache: KVCache, tables: list[dict[str, list[int]]],
                 swa_offsets: list[int], slots: list[int], positions: list[int]) -> None:
        dev = cache.device
        self.cache, self.pos_list = cache, positions
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.swa_offsets = torch.tensor(swa_offsets, dtype=torch.long, device=dev)
        self.tables = {k: _padded([t[k] for t in tables], dev) for k in tables[0]}
        self.rows = torch.arange(len(positions), device=dev)
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None
        self._entry_slots: dict[tuple[str, int, int], torch.Tensor] = {}
        self._completing: dict[int, torch.Tensor | None] = {}
        self._block_ends: tuple[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def window_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat swa slots [R, W] of each row's window (oldest first, the new token last) and
        which of those positions exist [R, W]: the same in every layer, so built once a step."""
        if self._window is None:
            bs, w = self.cache.block_size, self.cache.config.sliding_window
            pos = self.positions.unsqueeze(1) + torch.arange(1 - w, 1, device=self.cache.device)
            valid = pos >= 0
            pos = pos.clamp_min(0)
            block = (pos // bs - self.swa_offsets.unsqueeze(1)).clamp_min(0)
            self._window = (self.tables["swa"].gather(1, block) * bs + pos % bs, valid)
        return self._window

    def entry_slots(self, kind: str, per_block: int, ratio: int) -> torch.Tensor:
        """Flat slots [R, E] of the compressed entries of `kind` ("csa" / "hca"), -1 where a
        row has none yet; shared by every layer (and the indexer keys) of that kind."""
        key = (kind, per_block, ratio)
        if key not in self._entry_slots:
            counts = [(p + 1) // ratio for p in self.pos_list]
            ids = torch.arange(max(counts), device=self.cache.device)
            table = self.tables[kind]
            blocks = (ids // per_block).clamp_max(table.shape[1] - 1)
            slots = table[:, blocks] * per_block + ids % per_block
            have = torch.tensor(counts, dtype=torch.long, device=self.cache.device)
            self._entry_slots[key] = slots.masked_fill(ids >= have.unsqueeze(1), -1)
        return self._entry_slots[key]

    def completing_rows(self, ratio: int) -> torch.Tensor | None:
        """Rows [R_done] whose window of `ratio` tokens this token completes (None: no row);
        shared by every layer (and the indexer keys) of that ratio."""
        if ratio not in self._completing:
            done = [r for r, p in enumerate(self.pos_list) if (p + 1) % ratio == 0]
            self._completing[ratio] = (
                torch.tensor(done, dtype=torch.long, device=self.cache.device) if done else None)
        return self._completing[ratio]

    def block_ends(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, swa blocks): the rows whose token is the last of a cache block, and that
        block, when a prefix cache keeps CSA state there; None when there are none."""
        if self._block_ends is None:
            bs, found = self.cache.block_size, None
            rows = [r for r, p in enumerate(self.pos_list) if (p + 1) % bs == 0]
            if rows and self.cache.boundaries:
                index = torch.tensor(rows, dtype=torch.long, device=self.cache.device)
                logical = self.positions[index] // bs - self.swa_offsets[index]
                found = (index, self.tables["swa"][index, logical])
            self._block_ends = (found,)
        return self._block_ends[0]

    def layer(self, layer: int) -> _BatchedLayerStore:
        return _BatchedLayerStore(self, layer)


class _BatchedLayerStore:
    def __init__(self, group: DecodeGroup, layer: int) -> None:
        self.group = group
        self.window_flat = group.cache.window_flat(layer)
        self.compressor, self.indexer = group.cache.compressor_stores(
            layer, group, _BatchedCompressorStore)

    def window(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new window entry; return its window [R, W, D] (oldest first, the
        new token last) and which of those positions exist [R, W]."""
        slots, valid = self.group.window_slots()
        cache = self.group.cache
        cache.write("swa", self.window_flat, slots[:, -1], kv)
        keys = cache.read("swa", self.window_flat[slots[:, :-1]])
        return torch.cat([keys.to(kv.dtype), kv.unsqueeze(1)], dim=1), valid

    def window_entries(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                        _Decoder | None]:
        """As window(), but the window stays in the cache: (storage [1, S, ...], slots [R, W]
        with -1 for positions that do not exist, decoder)."""
        slots, valid = self.group.window_slots()
        cache = self.group.cache
        cache.write("swa", self.window_flat, slots[:, -1], kv)
        return (self.window_flat.unsqueeze(0), torch.where(valid, slots, -1),
                cache.decoder("swa"))


class _BatchedCompressorStore:
    def __init__(self, group: DecodeGroup, key: str, layer: int, ratio: int) -> None:
        self.group, self.ratio, self.overlap, self.layer = group, ratio, ratio == 4, layer
        kv_state, score_state = group.cache.states[key]
        self.kv, self.score = kv_state[layer], score_state[layer]  # [slots, rows, width]
        self.key = key
        self.flat, self.per_block, self.table = _compressed_storage(group.cache, group.tables,
                                                                    key, layer)
        self.num_entries = max((p + 1) // ratio for p in group.pos_list)  # after this token

    def write_token(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        g = self.group
        row = g.positions % self.ratio + (self.ratio if self.overlap else 0)
        self.kv[g.slots, row] = kv.to(self.kv.dtype)
        self.score[g.slots, row] = score.to(self.score.dtype)

    def completing_rows(self) -> torch.Tensor | None:
        return self.group.completing_rows(self.ratio)

    def completed_windows(self, done: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[R_done, slots, D] kv and scores of the windows completed by this token."""
        slots, m = self.group.slots[done], self.ratio
        # [R_done, rows, width]; indexing copies already
        kv, score = _widened(self.kv[slots], False), _widened(self.score[slots], False)
        if not self.overlap:
            return kv, score
        first = (self.group.positions[done] + 1 == m).view(-1, 1, 1)  # no previous window
        prev_kv = kv[:, :m, :dim].masked_fill(first, 0.0)
        prev_score = score[:, :m, :dim].masked_fill(first, float("-inf"))
        return (torch.cat([prev_kv, kv[:, m:, dim:]], dim=1),
                torch.cat([prev_score, score[:, m:, dim:]], dim=1))

    def append_completed(self, done: torch.Tensor, entries: torch.Tensor) -> None:
        ids = (self.group.positions[done] + 1) // self.ratio - 1
        table = self.table[done]
        slots = table.gather(1, (ids // self.per_block).unsqueeze(1))[:, 0] * self.per_block
        self.group.cache.write(self.key, self.flat, slots + ids % self.per_block, entries)
        if self.overlap:  # the completed window becomes the previous one
            s, m = self.group.slots[done], self.ratio
            self.kv[s, :m] = self.kv[s, m:]
            self.score[s, :m] = self.score[s, m:]
            ends = self.group.block_ends()  # rows whose token ends a cache block
            if ends is not None:
                slots = self.group.slots[ends[0]]
                self.group.cache.keep_boundaries(self.key, self.layer, ends[1],
                                                 self.kv[slots, :m], self.score[slots, :m])

    def entry_slots(self) -> tuple[torch.Tensor, torch.Tensor, _Decoder | None]:
        """(storage [1, S, D or bytes], slots [R, E] with -1 for entries a row does not have
        yet, decoder of stored rows or None)."""
        return (self.flat.unsqueeze(0),
                self.group.entry_slots(_kind(self.key), self.per_block, self.ratio),
                self.group.cache.decoder(self.key))
