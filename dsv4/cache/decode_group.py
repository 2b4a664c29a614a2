"""DecodeGroup: a step's decode rows in the paged cache, served together (vectorized).

The attention's DecodeRows path reads and writes through the stores handed out here
(`BatchedLayerStore` and `BatchedCompressorStore` of dsv4.model.cache_store, implemented
structurally): per-row block tables padded into matrices, one state slot and one position per
row, slot tensors built once per step and shared by every layer. The storage is `KVCache`'s
(dsv4.cache.kv_cache), like `RequestView`'s for the per-request Segment path.

A row is one token. A request that verifies k drafts (speculative decoding) has k + 1 rows at
consecutive positions, its j-th token in wave j; every plain decode is in wave 0. Window writes
and attention serve all rows at once (a row reads only positions up to its own, all written
before any read); compressor state advances wave by wave, as k + 1 one-token steps would
(a window may complete inside the drafts). Writes of waves >= 1 (drafts) to compressor state
are logged with the values they replace, so `rollback` can forget rejected drafts exactly.
"""

from __future__ import annotations

import torch

from dsv4.cache.kv_cache import KVCache, _compressed_storage, _Decoder, _kind, _widened

__all__ = ["DecodeGroup"]


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long,
                        device=device)


# one logged compressor-state write: (state tensor [slots, rows, width], state slots [n], state
# rows [n] or a slice of rows, the values they held before [n, ...], the group rows [n] written)
_Undo = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | slice", torch.Tensor, list[int]]


class DecodeGroup:
    """R rows of one token each in this step, served together (vectorized) by the attention's
    DecodeRows path: per-row block tables padded into matrices, one state slot and one position
    per row, and each row's wave (its token's index among its request's tokens of the step)."""

    def __init__(self, cache: KVCache, tables: list[dict[str, list[int]]],
                 swa_offsets: list[int], slots: list[int], positions: list[int],
                 waves: list[int] | None = None) -> None:
        dev = cache.device
        self.cache, self.pos_list = cache, positions
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.swa_offsets = torch.tensor(swa_offsets, dtype=torch.long, device=dev)
        self.tables = {k: _padded([t[k] for t in tables], dev) for k in tables[0]}
        self.rows = torch.arange(len(positions), device=dev)
        # rows of each wave (None: every row; the group has one wave)
        self.wave_rows: list[list[int] | None] = [None]
        self.wave_index: list[torch.Tensor | None] = [None]
        self.undo: list[_Undo] | None = None  # logged draft writes, with waves >= 1
        self._forgotten: set[int] = set()  # rows already rolled back
        if waves and max(waves):
            self.wave_rows = [[r for r, w in enumerate(waves) if w == j]
                              for j in range(max(waves) + 1)]
            self.wave_index = [torch.tensor(r, dtype=torch.long, device=dev)
                               for r in self.wave_rows]
            self.undo = []
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None
        self._entry_slots: dict[tuple[str, int, int], torch.Tensor] = {}
        self._completing: dict[tuple[int, int], torch.Tensor | None] = {}
        self._block_ends: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    @property
    def num_waves(self) -> int:
        return len(self.wave_rows)

    def members(self, wave: int) -> range | list[int]:
        """The group rows of `wave`."""
        rows = self.wave_rows[wave]
        return range(len(self.pos_list)) if rows is None else rows

    def log(self, wave: int, state: torch.Tensor, slots: torch.Tensor,
            rows: torch.Tensor | slice, group_rows: list[int]) -> None:
        """Keep what state[slots, rows] holds before a write by group rows of `wave` (nothing
        for wave 0: a step's first token of each request is always kept)."""
        if wave and self.undo is not None:
            self.undo.append((state, slots, rows, state[slots, rows], group_rows))

    def rollback(self, rejected: set[int]) -> None:
        """Undo the compressor-state writes of group rows `rejected` (a request's drafts from
        some wave on, for each request that rejects any), newest first: the state becomes what
        the kept rows alone leave. Entries and window KV written for rejected positions need
        nothing: they lie past what the kept positions count and are overwritten when computed
        again. Rows already rolled back are skipped."""
        rejected = rejected - self._forgotten
        if not rejected or self.undo is None:
            return
        self._forgotten |= rejected
        dev = self.cache.device
        for state, slots, rows, old, group_rows in reversed(self.undo):
            pick = [n for n, r in enumerate(group_rows) if r in rejected]
            if not pick:
                continue
            sel = torch.tensor(pick, dtype=torch.long, device=dev)
            state[slots[sel], rows if isinstance(rows, slice) else rows[sel]] = old[sel]

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

    def completing_rows(self, ratio: int, wave: int = 0) -> torch.Tensor | None:
        """Rows [R_done] of `wave` whose window of `ratio` tokens their token completes (None:
        no row); shared by every layer (and the indexer keys) of that ratio."""
        key = (ratio, wave)
        if key not in self._completing:
            done = [r for r in self.members(wave) if (self.pos_list[r] + 1) % ratio == 0]
            self._completing[key] = (
                torch.tensor(done, dtype=torch.long, device=self.cache.device) if done else None)
        return self._completing[key]

    def block_ends(self, wave: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, swa blocks): the rows of `wave` whose token is the last of a cache block, and
        that block, when a prefix cache keeps CSA state there; None when there are none."""
        if wave not in self._block_ends:
            bs, found = self.cache.block_size, None
            rows = [r for r in self.members(wave) if (self.pos_list[r] + 1) % bs == 0]
            if rows and self.cache.boundaries:
                index = torch.tensor(rows, dtype=torch.long, device=self.cache.device)
                logical = self.positions[index] // bs - self.swa_offsets[index]
                found = (index, self.tables["swa"][index, logical])
            self._block_ends[wave] = found
        return self._block_ends[wave]

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
        self.num_waves = group.num_waves

    def write_token(self, kv: torch.Tensor, score: torch.Tensor, wave: int) -> None:
        g = self.group
        slots, pos, index = g.slots, g.positions, g.wave_index[wave]
        if index is not None:
            slots, pos, kv, score = slots[index], pos[index], kv[index], score[index]
        row = pos % self.ratio + (self.ratio if self.overlap else 0)
        for state, new in ((self.kv, kv), (self.score, score)):
            g.log(wave, state, slots, row, g.wave_rows[wave])
            state[slots, row] = new.to(state.dtype)

    def completing_rows(self, wave: int) -> torch.Tensor | None:
        return self.group.completing_rows(self.ratio, wave)

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

    def append_completed(self, done: torch.Tensor, entries: torch.Tensor, wave: int) -> None:
        ids = (self.group.positions[done] + 1) // self.ratio - 1
        table = self.table[done]
        slots = table.gather(1, (ids // self.per_block).unsqueeze(1))[:, 0] * self.per_block
        self.group.cache.write(self.key, self.flat, slots + ids % self.per_block, entries)
        if self.overlap:  # the completed window becomes the previous one
            g, m = self.group, self.ratio
            s = g.slots[done]
            for state in (self.kv, self.score):
                if wave:
                    g.log(wave, state, s, slice(0, m), done.tolist())
                state[s, :m] = state[s, m:]
            ends = g.block_ends(wave)  # rows of the wave whose token ends a cache block
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
