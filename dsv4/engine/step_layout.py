"""StepLayout: where a step's rows lie on the flat token axis and which cache views serve them.

Decode rows (one token, or with speculative decoding the last sampled token and its drafts)
are attended together through one ``DecodeGroup`` (the attention's DecodeRows path): a row
with k drafts is k + 1 group rows at consecutive positions, in waves 0..k. Every other row (a
prefill chunk) gets its own ``RequestView`` and Segment. Built once per step by the model
runner; the trunk's layers and the MTP block's take their per-layer segments from it, and the
runner rolls rejected drafts back through it.
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
        self.views: dict[int, RequestView] = {}  # prefill chunks
        self.decoding: list[int] = []  # rows in the decode group
        self.group_first: dict[int, int] = {}  # a decoding row's first group row
        begin, n_group = 0, 0
        for i, ids in enumerate(batch.token_ids):
            self.begins.append(begin)
            if len(ids) == 1 or batch.num_drafts(i):
                self.decoding.append(i)
                self.group_first[i] = n_group
                n_group += len(ids)
            else:
                self.views[i] = RequestView(cache, self.tables(i), batch.swa_block_offsets[i],
                                            batch.state_slots[i], batch.num_computed_tokens[i])
            begin += len(ids)
        self.num_tokens = begin
        self.group: DecodeGroup | None = None
        self.decode_index: torch.Tensor | None = None
        if self.decoding:
            counts = [len(batch.token_ids[i]) for i in self.decoding]
            self.decode_index = torch.tensor(
                [self.begins[i] + j for i, n in zip(self.decoding, counts) for j in range(n)],
                dtype=torch.long, device=self.device)
            self.group = self.decode_group(
                self.decoding, [batch.num_computed_tokens[i] for i in self.decoding], counts)

    def tables(self, i: int) -> dict[str, list[int]]:
        return {kind: self.batch.block_tables[kind][i] for kind in self.batch.block_tables}

    def decode_group(self, rows: list[int], positions: list[int],
                     counts: list[int] | None = None) -> DecodeGroup:
        """Tokens of ``rows`` served together: counts[n] (default 1) of row rows[n], at
        positions[n] and on, its j-th token in wave j."""
        b, counts = self.batch, counts or [1] * len(rows)
        where = [(i, p + j, j) for i, p, n in zip(rows, positions, counts) for j in range(n)]
        return DecodeGroup(self.cache, [self.tables(i) for i, _, _ in where],
                           [b.swa_block_offsets[i] for i, _, _ in where],
                           [b.state_slots[i] for i, _, _ in where],
                           [p for _, p, _ in where], [j for _, _, j in where])

    def rollback(self, kept: dict[int, int]) -> None:
        """Forget the tokens of decoding row i from its kept[i]-th on (its rejected drafts; the
        first is always kept): the compressor state becomes what computing only the kept
        tokens leaves."""
        rejected = set()
        for i, keep in kept.items():
            if not 1 <= keep <= len(self.batch.token_ids[i]) or i not in self.group_first:
                raise ValueError(f"row {i}: cannot keep {keep} of its tokens")
            first = self.group_first[i]
            rejected.update(range(first + keep, first + len(self.batch.token_ids[i])))
        if rejected:
            self.group.rollback(rejected)

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
        cache layer ``layer``). The decoding rows' kept tokens stay one group."""
        index: list[int] = []
        begins: list[int] = []
        for i, m in enumerate(kept):
            begins.append(len(index))
            index.extend(range(self.begins[i], self.begins[i] + m))
        segs: list[Segment | DecodeRows] = [
            Segment(begins[i], begins[i] + kept[i], v.start_pos, v.layer(layer))
            for i, v in self.views.items() if kept[i]]
        rows = [i for i in self.decoding if kept[i]]
        if rows:
            counts = [kept[i] for i in rows]
            group = self.group
            if counts != [len(self.batch.token_ids[i]) for i in rows] or len(rows) < len(
                    self.decoding):  # rejected drafts drop out: the kept tokens' own group
                group = self.decode_group(
                    rows, [self.batch.num_computed_tokens[i] for i in rows], counts)
            where = torch.tensor([begins[i] + j for i, n in zip(rows, counts) for j in range(n)],
                                 dtype=torch.long, device=self.device)
            segs.append(DecodeRows(where, group.positions, group.layer(layer)))
        return torch.tensor(index, dtype=torch.long, device=self.device), begins, segs
