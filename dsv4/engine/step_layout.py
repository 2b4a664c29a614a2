"""StepLayout: where a step's rows lie on the flat token axis and which cache views serve them.

Rows with one token (decodes) are attended together through one ``DecodeGroup`` (the
attention's DecodeRows path); every other row (a prefill chunk, or a decode that verifies
drafts) gets its own ``RequestView`` and Segment. Built once per step by the model runner; the
trunk's layers and the MTP block's take their per-layer segments from it.
"""

from __future__ import annotations

import torch

from dsv4.cache.decode_group import DecodeGroup
from dsv4.cache.kv_cache import KVCache, RequestView
from dsv4.engine.batch import ScheduledBatch
from dsv4.model.attention import DecodeRows, Segment

__all__ = ["StepLayout"]


class StepLayout:
    def __init__(self, batch: ScheduledBatch, cache: KVCache) -> None:
        self.batch, self.cache, self.device = batch, cache, cache.device
        self.begins: list[int] = []  # each row's first token on the flat axis
        self.views: dict[int, RequestView] = {}  # rows with several tokens
        self.single: list[int] = []  # rows with one token, attended together
        begin = 0
        for i, ids in enumerate(batch.token_ids):
            self.begins.append(begin)
            if len(ids) == 1:
                self.single.append(i)
            else:
                self.views[i] = RequestView(cache, self.tables(i), batch.swa_block_offsets[i],
                                            batch.state_slots[i], batch.num_computed_tokens[i],
                                            speculative=batch.num_drafts(i) > 0)
            begin += len(ids)
        self.num_tokens = begin
        self.group: DecodeGroup | None = None
        self.decode_index: torch.Tensor | None = None
        if self.single:
            self.decode_index = torch.tensor([self.begins[i] for i in self.single],
                                             dtype=torch.long, device=self.device)
            self.group = self.decode_group(self.single,
                                           [batch.num_computed_tokens[i] for i in self.single])

    def tables(self, i: int) -> dict[str, list[int]]:
        return {kind: self.batch.block_tables[kind][i] for kind in self.batch.block_tables}

    def decode_group(self, rows: list[int], positions: list[int]) -> DecodeGroup:
        """One token for each of ``rows`` at ``positions``, served together."""
        b = self.batch
        return DecodeGroup(self.cache, [self.tables(i) for i in rows],
                           [b.swa_block_offsets[i] for i in rows],
                           [b.state_slots[i] for i in rows], positions)

    @property
    def speculative(self) -> dict[str, RequestView]:
        """The views of the rows with drafts, by request id (what a rollback rewinds)."""
        return {self.batch.req_ids[i]: v for i, v in self.views.items() if v.observed is not None}

    def segments(self, layer: int) -> list[Segment | DecodeRows]:
        """Every row's tokens in cache layer ``layer``."""
        segs: list[Segment | DecodeRows] = [
            Segment(self.begins[i], self.begins[i] + len(self.batch.token_ids[i]),
                    v.start_pos, v.layer(layer)) for i, v in self.views.items()]
        if self.group is not None:
            segs.append(DecodeRows(self.decode_index, self.group.positions,
                                   self.group.layer(layer)))
        return segs

    def kept_segments(self, layer: int, kept: list[int]
                      ) -> tuple[torch.Tensor, list[int], list[Segment | DecodeRows]]:
        """The first kept[i] tokens of every row on a new flat axis (row after row): (their
        index on the step's axis, each row's first place on the new axis, their segments in
        cache layer ``layer``). One-token rows keep their token and stay one group."""
        index: list[int] = []
        begins: list[int] = []
        for i, m in enumerate(kept):
            begins.append(len(index))
            index.extend(range(self.begins[i], self.begins[i] + m))
        segs: list[Segment | DecodeRows] = [
            Segment(begins[i], begins[i] + kept[i], v.start_pos, v.layer(layer))
            for i, v in self.views.items() if kept[i]]
        if self.group is not None:
            where = torch.tensor([begins[i] for i in self.single], dtype=torch.long,
                                 device=self.device)
            segs.append(DecodeRows(where, self.group.positions, self.group.layer(layer)))
        return torch.tensor(index, dtype=torch.long, device=self.device), begins, segs
