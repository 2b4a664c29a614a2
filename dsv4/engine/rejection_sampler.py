"""RejectionSampler: a step's sampling when rows verify draft tokens (speculative decoding).

A row with drafts d_1..d_k has logits at k + 1 positions: after its last token and after each
draft. Position j is processed as the token it would sample: the sampling parameters with the
drafts before it counted as output (penalties, min_tokens, the seed's output index). Each
position samples its token t_j exactly as ``Sampler`` would (greedy: the argmax; else
Gumbel-max over the processed distribution p_j with the row's noise for that output index).
Draft d_{j+1} is accepted while it equals t_j; the first position where it does not emits t_j,
and if every draft is accepted the last position's token is the bonus. This is rejection
sampling for the one-hot draft distribution of a greedy drafter, coupled through the noise:
d is accepted with probability p_j(d), and a rejected position emits t_j given t_j != d,
which is p_j with d's mass removed, renormalized. It also makes the emitted tokens the ones
the row samples without speculation from the same logits: a seeded request gives the same
output with or without drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.sampler import LogprobsTensors, Sampler, SamplingMetadata

__all__ = ["RejectionSampler", "VerifyLayout"]


class VerifyLayout:
    """The sampling rows of a step by verified position: row r's positions are
    offsets[r] .. offsets[r] + len(drafts[r]) (the logits' rows, in order, as
    ``SamplingMetadata.from_batch`` lays them out)."""

    def __init__(self, drafts: Sequence[Sequence[int]]) -> None:
        self.drafts = [list(d) for d in drafts]
        self.offsets, n = [], 0
        for d in self.drafts:
            self.offsets.append(n)
            n += len(d) + 1
        self.num_positions = n

    @classmethod
    def of(cls, batch: ScheduledBatch) -> VerifyLayout:
        return cls([batch.token_ids[i][len(batch.token_ids[i]) - batch.num_drafts(i):]
                    for i in batch.sample_indices])


class RejectionSampler:
    def __init__(self, sampler: Sampler | None = None) -> None:
        self.sampler = sampler or Sampler()

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata, layout: VerifyLayout
                 ) -> tuple[list[list[int]], LogprobsTensors | None]:
        """logits [num_positions, vocab] -> (tokens per sampling row: accepted drafts and one
        more, logprobs of those tokens as the target scores them, row after row, or None)."""
        sampler = self.sampler
        logits = logits.float()
        raw = (torch.log_softmax(logits, dim=-1)
               if metadata.max_num_logprobs is not None else None)
        processed = sampler.process(logits, metadata)
        sampled = processed.argmax(dim=-1)
        if not metadata.all_greedy:
            sampled = torch.where(metadata.is_greedy, sampled,
                                  sampler.sample_random(processed, metadata))
        sampled_ids = sampled.tolist()
        tokens: list[list[int]] = []
        scored: list[int] = []  # the position each emitted token was sampled at
        for off, drafts in zip(layout.offsets, layout.drafts):
            out: list[int] = []
            for j in range(len(drafts) + 1):
                scored.append(off + j)
                out.append(sampled_ids[off + j])
                if j == len(drafts) or drafts[j] != out[-1]:
                    break
            tokens.append(out)
        logprobs = None
        if raw is not None:
            index = torch.tensor(scored, dtype=torch.long, device=logits.device)
            emitted = torch.tensor([t for out in tokens for t in out], device=logits.device)
            logprobs = Sampler.gather_logprobs(raw[index], emitted, metadata.max_num_logprobs)
        return tokens, logprobs
