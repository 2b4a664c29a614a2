"""MTPProposer: draft tokens from V4's own MTP block (architecture.md 2.8), in the paged cache.

The block reads the trunk's pre-head streams at position i with the embedding of token i + 1
and predicts token i + 2. After each step it runs over every row's kept tokens (a prefill
chunk, a decode, or a verified row's first token and accepted drafts), so its sliding-window
cache (one more swa layer after the trunk's) always holds the sequence's real positions; the
next token is the one known after the chunk or the one sampled. The logits at a proposing
row's last kept position give draft 1 (greedy). Drafts 2..K apply the block again to its own
output streams and the previous draft, one position further each time (as vLLM and SGLang do
for V3/V4's MTP); what those deeper positions write in the block's cache is overwritten by the
next step before anything reads it. Under data-parallel attention every rank runs the block
the same number of times (its MoE meets the other groups), with zero rows where it has none.
"""

from __future__ import annotations

import torch

from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.step_layout import StepLayout
from dsv4.model.attention import DecodeRows
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM

__all__ = ["MTPProposer"]


class MTPProposer:
    def __init__(self, model: DeepseekV4ForCausalLM, num_speculative_tokens: int) -> None:
        if not len(model.mtp):
            raise ValueError("speculative decoding needs the model's MTP block (mtp.0.*)")
        self.model, self.k = model, num_speculative_tokens
        self.first_layer = len(model.layers)  # cache layer of MTP block 0
        self.lockstep = model.parallel.dp.size > 1  # ranks of other groups wait in the MoE

    def _depth(self, j: int) -> tuple[int, int]:
        """(MTP block, its cache layer) drafting token j (0-based): the blocks in turn."""
        block = j % len(self.model.mtp)
        return block, self.first_layer + block

    def propose(self, batch: ScheduledBatch, layout: StepLayout, h: torch.Tensor,
                kept: list[int], next_ids: list[int]) -> list[list[int]]:
        """Drafts per row (batch.num_propose_tokens[i] of them). h [1, N, hc, dim]: the
        trunk's streams of the step; kept[i]: row i's tokens that stay (its first ones);
        next_ids[i]: the token after them."""
        model, device = self.model, layout.device
        block, layer = self._depth(0)
        index, begins, segs = layout.kept_segments(layer, kept)
        ids = [t for i, m in enumerate(kept) if m
               for t in (*batch.token_ids[i][1:m], next_ids[i])]
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        x = model.mtp_streams(h[:, index], ids_t, segs, depth=block)
        rows = [i for i, n in enumerate(batch.num_propose_tokens) if n > 0]
        drafts: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        last = torch.tensor([begins[i] + kept[i] - 1 for i in rows], dtype=torch.long,
                            device=device)
        x = x[:, last]  # [1, R, hc, dim]: the streams each draft goes on from
        positions = [batch.num_computed_tokens[i] + kept[i] - 1 for i in rows]
        prev = torch.zeros(0, dtype=torch.long, device=device)  # the last drafts, per row
        for j in range(self.k):
            if j:  # apply the block again, one position on, to its output and the last draft
                block, layer = self._depth(j)
                rows_j = [r for r, i in enumerate(rows) if batch.num_propose_tokens[i] > j]
                if not rows_j and not self.lockstep:
                    break
                pick = torch.tensor(rows_j, dtype=torch.long, device=device)
                rows, positions = [rows[r] for r in rows_j], [positions[r] + 1 for r in rows_j]
                x, prev = x[:, pick], prev[pick]
                segs = []
                if rows:
                    group = layout.decode_group(rows, positions)
                    segs = [DecodeRows(torch.arange(len(rows), device=device), group.positions,
                                       group.layer(layer))]
                x = model.mtp_streams(x, prev.view(1, -1), segs, depth=block)
            if not rows:
                if not self.lockstep:
                    break
                continue
            prev = model.logits(x, owner=model.mtp[block])[0].argmax(dim=-1)
            for i, t in zip(rows, prev.tolist()):
                drafts[i].append(t)
        return drafts

    def idle(self) -> None:
        """A step with no rows on this rank, under data-parallel attention: run the block as
        often as the ranks with rows do, on zero tokens."""
        empty = torch.zeros(1, 0, dtype=torch.long, device=self.model.embed.weight.device)
        h = torch.zeros(1, 0, self.model.config.hc_mult, self.model.config.hidden_size,
                        dtype=self.model.compute_dtype, device=empty.device)
        for j in range(self.k):
            self.model.mtp_streams(h, empty, [], depth=self._depth(j)[0])
