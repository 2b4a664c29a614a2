"""ModelRunner: one batched forward per step over the paged cache, then sampling.

Owns the tensors: the model, the KVCache (allocated once from the memory budget) and the sampler.
A ScheduledBatch becomes one flat token row [1, N] (no padding to the longest request): per-token
work (projections, MoE, mHC) runs on all N tokens together; each request's tokens are one
attention segment reading its own window and compressed entries through its block tables.
Logits are computed only for the rows that sample, plus the prompt positions of requests that
ask for prompt_logprobs (in slices of _PROMPT_LOGITS_ROWS rows, so a long chunk never holds
[chunk, vocab] logits at once).
"""

from __future__ import annotations

import torch

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.kv_cache import DecodeGroup, KVCache, RequestView
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.sampler import LogprobsTensors, Sampler, SamplerOutput, SamplingMetadata
from dsv4.model.attention import DecodeRows, Segment
from dsv4.model.decode_graph import DecodeGraphs
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM

__all__ = ["ModelRunner", "PromptLogprobs", "StepResult"]

_PROMPT_LOGITS_ROWS = 256

# per request id: (first prompt position scored, LogprobsTensors whose column 0 is the prompt
# token that follows each scored position)
PromptLogprobs = dict[str, tuple[int, LogprobsTensors]]
# what one step of a batch gives: new token ids per row, the sampler's output, prompt logprobs
StepResult = tuple[list[list[int]], SamplerOutput | None, PromptLogprobs]


class ModelRunner:
    def __init__(self, model: DeepseekV4ForCausalLM, block_manager: BlockManager,
                 kv_cache_dtype: str = "fp32", index_cache_dtype: str | None = None,
                 state_dtype: str = "fp32", compile_decode: bool = False) -> None:
        self.model = model
        # pure decode steps through the per-bucket compiled regions (None: always eager)
        self.decode_graphs = DecodeGraphs(model) if compile_decode else None
        self.device = model.embed.weight.device
        self.kv_cache = KVCache(model.config, block_manager, self.device, model.compute_dtype,
                                kv_cache_dtype, index_cache_dtype, state_dtype)
        self.sampler = Sampler()
        # the last step's rows with draft tokens, by request id, until rollback() or the next step
        self.speculative: dict[str, RequestView] = {}

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one step; returns new token ids per row ([] for rows that do not sample), the
        sampler's output and the prompt logprobs of this step's prompt positions."""
        if batch.is_empty:
            if self.model.parallel.dp.size > 1:  # another data-parallel group has work: the
                # MoE layers need this rank in their collectives all the same
                self.model.run_layers(torch.zeros(1, 0, dtype=torch.long, device=self.device),
                                      lambda layer: [])
            return [], None, {}
        flat = [t for ids in batch.token_ids for t in ids]
        input_ids = torch.tensor([flat], dtype=torch.long, device=self.device)
        starts_cached = [i for i, block in enumerate(batch.boundary_blocks) if block]
        if starts_cached:  # requests that start after a cached prefix: its CSA state
            self.kv_cache.load_boundaries([batch.state_slots[i] for i in starts_cached],
                                          [batch.boundary_blocks[i] for i in starts_cached])
        def tables(i: int) -> dict[str, list[int]]:
            return {kind: batch.block_tables[kind][i] for kind in batch.block_tables}

        views, bounds, begin = [], [], 0
        self.speculative = {}
        single: list[int] = []  # rows with one token: attended together (DecodeRows)
        starts: list[int] = []  # their token's place on the flat axis
        for i in range(batch.num_reqs):
            n = len(batch.token_ids[i])
            if n == 1:
                single.append(i)
                starts.append(begin)
            else:
                drafts = batch.num_draft_tokens[i] if batch.num_draft_tokens else 0
                views.append(RequestView(self.kv_cache, tables(i), batch.swa_block_offsets[i],
                                         batch.state_slots[i], batch.num_computed_tokens[i],
                                         speculative=drafts > 0))
                if drafts:
                    self.speculative[batch.req_ids[i]] = views[-1]
                bounds.append((begin, begin + n))
            begin += n
        group = decode_index = None
        if single:
            decode_index = torch.tensor(starts, dtype=torch.long, device=self.device)
            group = DecodeGroup(
                self.kv_cache, [tables(i) for i in single],
                [batch.swa_block_offsets[i] for i in single], [batch.state_slots[i] for i in single],
                [batch.num_computed_tokens[i] for i in single])

        def layer_segments(layer: int) -> list[Segment | DecodeRows]:
            segs: list[Segment | DecodeRows] = [
                Segment(b, e, v.start_pos, v.layer(layer)) for (b, e), v in zip(bounds, views)]
            if group is not None:
                segs.append(DecodeRows(decode_index, group.positions, group.layer(layer)))
            return segs

        if self.decode_graphs is not None and group is not None and not views:
            h = self.decode_graphs.run_layers(input_ids, group.positions, group.layer)
        else:
            h = self.model.run_layers(input_ids, layer_segments)
        prompt_lps = self._prompt_logprobs(batch, h)
        rows = batch.sample_indices
        if not rows:
            return [[] for _ in range(batch.num_reqs)], None, prompt_lps
        index = torch.tensor(batch.logits_indices(), dtype=torch.long, device=self.device)
        logits = self.model.logits(h[:, index])[0]  # [num_sampling_rows, vocab]
        meta = SamplingMetadata.from_batch(batch, self.device, self.model.config.vocab_size)
        out = self.sampler(logits, meta)
        sampled = out.sampled_token_ids.tolist()
        result: list[list[int]] = [[] for _ in range(batch.num_reqs)]
        for row, token in zip(rows, sampled):
            result[row] = [token]
        return result, out, prompt_lps

    def rollback(self, request_id: str, end: int) -> None:
        """Forget the last step's tokens of a speculative row from position ``end`` on (its
        rejected drafts): the compressor state becomes what computing only [0, end) leaves.
        The scheduler sets the request's num_computed_tokens to ``end`` likewise."""
        self.speculative[request_id].rollback(end)

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
