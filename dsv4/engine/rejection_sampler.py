"""RejectionSampler: a step's sampling when rows verify draft tokens (speculative decoding).

A row with drafts d_1..d_k has logits at k + 1 positions: after its last token and after each
draft. Position j is processed as the token it would sample: the sampling parameters with the
drafts before it counted as output (penalties, min_tokens, the seed's output index). Draft
d_{j+1} is accepted while it matches the greedy choice (greedy rows) or while a uniform draw
u < p_j(d_{j+1}) (other rows: rejection sampling with a one-hot draft distribution, as the MTP
block drafts greedily). The first rejected position samples from p_j with the draft's mass
removed; if every draft is accepted, the last position samples a bonus token. This keeps each
token's distribution exactly the target's (Leviathan et al.'s rule with q one-hot). A row
without drafts samples as ``Sampler`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import torch

from dsv4.engine.batch import GrammarMask, ScheduledBatch
from dsv4.engine.sampler import LogprobsTensors, Sampler, SamplingMetadata

__all__ = ["RejectionSampler", "VerifyLayout"]


class VerifyLayout:
    """The sampling rows of a step by verified position: row r's positions are
    offsets[r] .. offsets[r] + len(drafts[r]) (the logits' rows, in order)."""

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

    def metadata(self, batch: ScheduledBatch, device: torch.device | str,
                 vocab_size: int | None, step_seed: int | None) -> SamplingMetadata:
        """SamplingMetadata with one row per verified position."""
        params, outputs, prompts, index, eos = [], [], [], [], []
        for r, i in enumerate(batch.sample_indices):
            done = list(batch.output_token_ids[i])
            for j in range(len(self.drafts[r]) + 1):
                params.append(batch.sampling_params[i])
                outputs.append(done + self.drafts[r][:j])
                prompts.append(batch.prompt_token_ids[i])
                index.append(batch.num_output_tokens[i] + j)
                eos.append(batch.eos_token_ids[i] if batch.eos_token_ids else None)
        grammar = batch.grammar
        if isinstance(grammar, Future):
            grammar = grammar.result()
        if grammar is not None:  # rows under a grammar have no drafts: one position each
            grammar = GrammarMask([self.offsets[r] for r in grammar.rows], grammar.bitmask,
                                  [(self.offsets[r], t) for r, t in grammar.banned])
        meta = SamplingMetadata.build(params, device, output_token_ids=outputs,
                                      prompt_token_ids=prompts, output_index=index,
                                      vocab_size=vocab_size, eos_token_ids=eos, grammar=grammar)
        meta.step_seed = step_seed
        return meta


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
        greedy = processed.argmax(dim=-1)
        final, probs, noise = greedy, None, None
        if not metadata.all_greedy:
            probs = sampler.probabilities(processed, metadata)
            noise = sampler.exponential_noise(probs, metadata)
            final = torch.where(metadata.is_greedy, greedy, probs.div(noise).argmax(dim=-1))
        accepted = self._accepted(layout, metadata, greedy, probs)
        is_greedy = metadata.is_greedy.tolist()
        final_ids = final.tolist()
        tokens: list[list[int]] = []
        scored: list[int] = []  # the position each emitted token was sampled at
        for r, (off, drafts) in enumerate(zip(layout.offsets, layout.drafts)):
            out: list[int] = []
            for j, draft in enumerate(drafts):
                pos = off + j
                scored.append(pos)
                if accepted[pos]:
                    out.append(draft)
                    continue
                if is_greedy[pos]:
                    out.append(final_ids[pos])
                else:  # the target's distribution less the rejected draft's mass
                    residual = probs[pos].clone()
                    residual[draft] = 0.0
                    out.append(int(residual.div(noise[pos]).argmax()))
                break
            else:
                scored.append(off + len(drafts))
                out.append(final_ids[off + len(drafts)])
            tokens.append(out)
        logprobs = None
        if raw is not None:
            index = torch.tensor(scored, dtype=torch.long, device=logits.device)
            emitted = torch.tensor([t for out in tokens for t in out], device=logits.device)
            logprobs = Sampler.gather_logprobs(raw[index], emitted, metadata.max_num_logprobs)
        return tokens, logprobs

    def _accepted(self, layout: VerifyLayout, metadata: SamplingMetadata,
                  greedy: torch.Tensor, probs: torch.Tensor | None) -> dict[int, bool]:
        """Position -> whether the draft that follows it is accepted (positions with one)."""
        positions = [off + j for off, d in zip(layout.offsets, layout.drafts)
                     for j in range(len(d))]
        if not positions:
            return {}
        device = greedy.device
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        ids = torch.tensor([t for d in layout.drafts for t in d], dtype=torch.long, device=device)
        ok = greedy[pos] == ids
        if probs is not None:
            u = self.sampler.uniforms(metadata, device)[pos]
            ok = torch.where(metadata.is_greedy[pos], ok, u < probs[pos, ids])
        return dict(zip(positions, ok.tolist()))
