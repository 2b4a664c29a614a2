"""ModelRunner: one batched forward per step over the paged cache, then sampling.

Owns the tensors: the model, the KVCache (allocated once from the memory budget) and the sampler.
A ScheduledBatch becomes one flat token row [1, N] (no padding to the longest request): per-token
work (projections, MoE, mHC) runs on all N tokens together; each request's tokens are one
attention segment reading its own window and compressed entries through its block tables.
Logits are computed only for the rows that sample, plus the prompt positions of requests that
ask for prompt_logprobs (in slices of _PROMPT_LOGITS_ROWS rows, so a long chunk never holds
[chunk, vocab] logits at once).

With speculative decoding on (``num_speculative_tokens`` K), a decode row may carry drafts: it
is verified in the same forward (logits at each of its k + 1 positions, ``RejectionSampler``),
its rejected drafts are rolled back in the compressor state, and the MTP block
(``MTPProposer``) then drafts the next step's tokens for every sampling row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.kv_cache import KVCache
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.mtp_proposer import MTPProposer
from dsv4.engine.rejection_sampler import RejectionSampler, VerifyLayout
from dsv4.engine.sampler import LogprobsTensors, Sampler, SamplerOutput, SamplingMetadata
from dsv4.engine.step_layout import StepLayout
from dsv4.model.decode_graph import DecodeGraphs
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM

__all__ = ["ModelRunner", "PromptLogprobs", "StepResult"]

_PROMPT_LOGITS_ROWS = 256

# per request id: (first prompt position scored, LogprobsTensors whose column 0 is the prompt
# token that follows each scored position)
PromptLogprobs = dict[str, tuple[int, LogprobsTensors]]


class StepResult(NamedTuple):
    """What one step of a batch gives."""

    sampled: list[list[int]]  # new token ids per row
    output: SamplerOutput | None  # logprobs: one row per new token, row after row
    prompt_logprobs: PromptLogprobs
    drafts: list[list[int]]  # per row, drafts for its next step (speculative decoding)


class ModelRunner:
    def __init__(self, model: DeepseekV4ForCausalLM, block_manager: BlockManager,
                 kv_cache_dtype: str = "fp32", index_cache_dtype: str | None = None,
                 state_dtype: str = "fp32", num_speculative_tokens: int = 0,
                 compile_decode: bool = False) -> None:
        self.model = model
        # pure decode steps through the per-bucket compiled regions (None: always eager)
        self.decode_graphs = DecodeGraphs(model) if compile_decode else None
        self.device = model.embed.weight.device
        self.kv_cache = KVCache(model.config, block_manager, self.device, model.compute_dtype,
                                kv_cache_dtype, index_cache_dtype, state_dtype)
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.proposer = (MTPProposer(model, num_speculative_tokens)
                         if num_speculative_tokens else None)
        # a test hook: (request id, its token ids so far, drafts proposed) -> drafts to use
        self.draft_override: Callable[[str, list[int], list[int]], list[int]] | None = None
        # the last step's layout, for rollback(), until the next step
        self.layout: StepLayout | None = None

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step; returns new token ids per row ([] for rows that do not sample; a row
        that verified drafts gets its accepted drafts and one more), the sampler's output
        (logprobs one row per new token, row after row), the prompt logprobs of this step's
        prompt positions, and the drafts proposed for each row's next step."""
        if batch.is_empty:
            if self.model.parallel.dp.size > 1:  # another data-parallel group has work: the
                # MoE layers need this rank in their collectives all the same
                self.model.run_layers(torch.zeros(1, 0, dtype=torch.long, device=self.device),
                                      lambda layer: [])
                if self.proposer is not None:
                    self.proposer.idle()
            return StepResult([], None, {}, [])
        flat = [t for ids in batch.token_ids for t in ids]
        input_ids = torch.tensor([flat], dtype=torch.long, device=self.device)
        starts_cached = [i for i, block in enumerate(batch.boundary_blocks) if block]
        if starts_cached:  # requests that start after a cached prefix: its CSA state
            self.kv_cache.load_boundaries([batch.state_slots[i] for i in starts_cached],
                                          [batch.boundary_blocks[i] for i in starts_cached])
        layout = self.layout = StepLayout(batch, self.kv_cache)
        if self.decode_graphs is not None and layout.group is not None and not layout.views:
            h = self.decode_graphs.run_layers(input_ids, layout.group.positions,
                                              layout.group.layer)
        else:
            h = self.model.run_layers(input_ids, layout.segments)
        prompt_lps = self._prompt_logprobs(batch, h)
        rows = batch.sample_indices
        result: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        out = None
        if rows:
            index = torch.tensor(batch.logits_indices(), dtype=torch.long, device=self.device)
            logits = self.model.logits(h[:, index])[0]  # [sampled positions, vocab]
            meta = SamplingMetadata.from_batch(batch, self.device, self.model.config.vocab_size)
            if self.proposer is None:  # one position per row
                out = self.sampler(logits, meta)
                for row, token in zip(rows, out.sampled_token_ids.tolist()):
                    result[row] = [token]
            else:
                tokens, logprobs = self.rejection_sampler(logits, meta, VerifyLayout.of(batch))
                for row, new in zip(rows, tokens):
                    result[row] = new
                out = SamplerOutput(torch.tensor([t for new in tokens for t in new]), logprobs)
        drafts: list[list[int]] = []
        if self.proposer is not None:
            # a row that verifies keeps its first token, its accepted drafts and no more; one
            # with drafts that does not sample keeps them all until rollback() is called
            kept = [len(ids) - batch.num_drafts(i) + len(result[i]) - 1 if result[i]
                    else len(ids) for i, ids in enumerate(batch.token_ids)]
            layout.rollback({i: kept[i] for i in range(batch.num_reqs)
                             if batch.num_drafts(i) and kept[i] < len(batch.token_ids[i])})
            nxt = [result[i][-1] if result[i] else batch.next_token_ids[i]
                   for i in range(batch.num_reqs)]
            drafts = self.proposer.propose(batch, layout, h, kept, nxt)
            if self.draft_override is not None:
                drafts = self._override(batch, result, drafts)
        return StepResult(result, out, prompt_lps, drafts)

    def _override(self, batch: ScheduledBatch, result: list[list[int]],
                  drafts: list[list[int]]) -> list[list[int]]:
        """The test hook's drafts (same count as proposed) for every proposing row."""
        out = []
        for i, proposed in enumerate(drafts):
            if not proposed:
                out.append(proposed)
                continue
            so_far = [*batch.prompt_token_ids[i], *batch.output_token_ids[i], *result[i]]
            forced = list(self.draft_override(batch.req_ids[i], so_far, proposed))
            out.append(forced[:len(proposed)])
        return out

    def rollback(self, request_id: str, end: int) -> None:
        """Forget the last step's tokens of a row with drafts from position ``end`` on: the
        compressor state becomes what computing only [0, end) leaves. ``execute`` does this
        itself for the drafts its verification rejects (a row with drafts that does not
        sample keeps them until this is called); forgotten tokens stay forgotten."""
        batch = self.layout.batch
        i = batch.req_ids.index(request_id)
        self.layout.rollback({i: end - batch.num_computed_tokens[i]})

    def _prompt_logprobs(self, batch: ScheduledBatch, h: torch.Tensor) -> PromptLogprobs:
        """Log-softmax of the logits at each scheduled position p < prompt length - 1 of rows
        whose params ask for prompt_logprobs, scored against prompt token p + 1."""
        found: PromptLogprobs = {}
        # most steps have no row that asks; every rank of a multi-process engine gets the same
        # batch, so all ranks of a tensor-parallel group make the same head calls here
        if not any(p.prompt_logprobs is not None for p in batch.sampling_params):
            return found
        begin = 0
        for i, ids in enumerate(batch.token_ids):
            params, start = batch.sampling_params[i], batch.num_computed_tokens[i]
            prompt = batch.prompt_token_ids[i]
            stop = min(start + len(ids), len(prompt) - 1)
            # a request with output already handed its prompt logprobs out (a preempted one
            # recomputes its prompt; no need to score it again)
            if params.prompt_logprobs is not None and stop > start \
                    and not batch.num_output_tokens[i]:
                parts = []
                for lo in range(start, stop, _PROMPT_LOGITS_ROWS):
                    hi = min(stop, lo + _PROMPT_LOGITS_ROWS)
                    logp = self.model.logits(h[:, begin + lo - start:begin + hi - start])[0]
                    targets = torch.tensor(prompt[lo + 1:hi + 1], device=self.device)
                    parts.append(Sampler.gather_logprobs(logp.log_softmax(-1), targets,
                                                         params.prompt_logprobs))
                found[batch.req_ids[i]] = (start, LogprobsTensors(
                    *(torch.cat([getattr(part, f) for part in parts])
                      for f in ("token_ids", "logprobs", "sampled_token_ranks"))))
            begin += len(ids)
        return found
