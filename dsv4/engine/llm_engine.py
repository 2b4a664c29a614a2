"""LLMEngine: the step loop. Owns the scheduler (CPU) and the model runner (tensors).

``add_request`` validates and queues one completion (``n`` is fanned out above the engine, by
``dsv4.input_processor``), ``step()`` schedules one batch, runs it and returns one
``EngineOutput`` per request that advanced, ``abort_request`` ends a request at any time. Token
ids only: text, stop strings and chat templates live above it. Build one with
``dsv4.EngineArgs(...).create_engine()``. Not thread-safe: one thread drives it (see
``dsv4.async_llm``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.spec import kv_bytes_per_seq, kv_bytes_per_token, state_bytes_per_seq
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.executor import Workers
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.model_runner import ModelRunner, StepResult
from dsv4.engine.outputs import (EngineOutput, EngineStats, StepError, TokenLogprobs,
                                 WorkerDiedError)
from dsv4.engine.request import Request, RequestStatus, StepOutput
from dsv4.engine.sampler import LogprobsTensors, SamplerOutput
from dsv4.engine.scheduler import Scheduler
from dsv4.engine.structured_output import StructuredOutputManager
from dsv4.errors import InvalidRequestError
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.sampling_params import SamplingParams, validate_prompt
from dsv4.structured_outputs import GrammarCompiler
from dsv4.tokenizer import Tokenizer

__all__ = ["LLMEngine"]

logger = logging.getLogger(__name__)


def _token_logprobs(t: LogprobsTensors, rows: slice, n: int) -> list[TokenLogprobs]:
    """Rows of sampler-layout logprobs (column 0 the chosen token, then the top ones) with the
    top-n each."""
    ids, lps = t.token_ids[rows].tolist(), t.logprobs[rows].tolist()
    ranks = t.sampled_token_ranks[rows].tolist()
    return [TokenLogprobs(i[0], lp[0], r, list(zip(i[1:n + 1], lp[1:n + 1])))
            for i, lp, r in zip(ids, lps, ranks)]


class LLMEngine:
    def __init__(self, model: DeepseekV4ForCausalLM, engine_config: EngineConfig,
                 eos_token_id: int | None = None, workers: Workers | None = None) -> None:
        engine_config.check_model(model.config)
        if engine_config.kv_cache_memory is None:
            raise ValueError("kv_cache_memory is not set: build the engine with "
                             "EngineArgs(...).create_engine() or give it in bytes")
        self.model, self.config = model, engine_config
        self.workers = workers  # the other ranks of a multi-process engine
        self.model_config = model.config
        self.eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
        # one scheduler and block plan per data-parallel group (each group's ranks hold their
        # own KV cache); group 0 runs here. One group unless DP-attention is on.
        groups = model.parallel.config.data_parallel_size
        # what cached blocks depend on besides the config and the cache dtypes
        content = f"compute={model.compute_dtype} qat={model.emulate_quant}"
        self.schedulers = [
            Scheduler(engine_config, BlockManager.from_config(model.config, engine_config,
                                                              content))
            for _ in range(groups)]
        self.scheduler = self.schedulers[0]
        self.block_manager = self.scheduler.block_manager
        self.runner = ModelRunner(model, self.block_manager, engine_config.kv_cache_dtype,
                                  engine_config.index_cache_dtype,
                                  engine_config.compressor_state_dtype,
                                  engine_config.num_speculative_tokens,
                                  engine_config.compile_decode)
        info = self.cache_info()
        logger.info("KV cache: %.2f GiB (%s entries, %s indexer keys) holds %d tokens over %d "
                    "running requests at most; %.1f B/token, %.2f GiB per %d-token sequence",
                    info["memory_bytes"] / 2**30, engine_config.kv_cache_dtype,
                    engine_config.index_cache_dtype or "fp4", info["max_tokens"],
                    info["num_state_slots"], info["bytes_per_token"],
                    info["bytes_per_max_sequence"] / 2**30, engine_config.max_model_len)
        self._params: dict[str, SamplingParams] = {}  # unfinished request -> its params
        # prompt logprobs being collected, until they go out with the first token
        self._prompt_lps: dict[str, list[TokenLogprobs]] = {}
        self._num_prompt_tokens = self._num_generation_tokens = 0
        # grammar state of the requests with structured outputs (see enable_structured_outputs)
        self.structured = StructuredOutputManager(model.config.vocab_size)

    def enable_structured_outputs(self, tokenizer: Tokenizer) -> GrammarCompiler:
        """Let requests carry ``structured_outputs``: grammars compile against ``tokenizer``.
        Returns the compiler (shared with the server, which checks specs before submitting);
        calling it again keeps the first one."""
        if self.structured.compiler is None:
            self.structured.enable(GrammarCompiler(tokenizer, self.model_config.vocab_size))
        return self.structured.compiler

    def cache_info(self) -> dict[str, float]:
        """KV-cache figures of this engine: allocated bytes, tokens the pools hold, asymptotic
        bytes per token, bytes of one max_model_len sequence (entries + window + compressor
        state), state slots."""
        bm = self.block_manager
        specs = bm.specs
        n = self.config.max_model_len
        compressed = [pool.num_usable_blocks for kind, pool in bm.pools.items() if kind != "swa"]
        return {"memory_bytes": self.runner.kv_cache.memory_bytes(),
                "max_tokens": (min(compressed) * bm.block_size if compressed
                               else bm.num_state_slots * n),
                "bytes_per_token": kv_bytes_per_token(specs),
                "bytes_per_max_sequence": kv_bytes_per_seq(specs, n) + state_bytes_per_seq(specs),
                "num_state_slots": bm.num_state_slots}

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue one completion; raises InvalidRequestError naming the problem (nothing is
        queued then)."""
        if request_id in self._params:
            raise InvalidRequestError(f"request id {request_id!r} is already in use",
                                      param="request_id")
        if params.n != 1:
            raise InvalidRequestError(f"the engine runs one completion per request, got n="
                                      f"{params.n}; fan n out above it (dsv4.input_processor)",
                                      param="n")
        validate_prompt(prompt_token_ids, params, self.config.max_model_len,
                        self.model_config.vocab_size)
        self.structured.add_request(request_id, params, prompt_token_ids)
        request = Request(request_id, prompt_token_ids, params, eos_token_id=self.eos_token_id)
        scheduler = self.scheduler
        if len(self.schedulers) > 1:  # the data-parallel group that has the longest cached
            # prefix of it takes it (each group has its own cache), then the least loaded
            scheduler = min(self.schedulers, key=lambda s: (-s.cached_prefix_tokens(request),
                                                            len(s.requests)))
        try:
            scheduler.add_request(request)
        except BaseException:
            self.structured.remove(request_id)
            raise
        self._params[request_id] = params
        if params.prompt_logprobs is not None:
            self._prompt_lps[request_id] = []

    def abort_request(self, request_id: str) -> list[EngineOutput]:
        """End a request now; its blocks are free on return. Unknown ids are ignored."""
        return self._convert(self._scheduler_of(request_id).abort_requests([request_id]))

    def finish_request(self, request_id: str, stop_reason: str) -> list[EngineOutput]:
        """End a request because the text layer matched a stop string; returns its final
        (empty, finished) output so streaming consumers see the end."""
        done = self._scheduler_of(request_id).finish_requests(
            [request_id], RequestStatus.FINISHED_STOPPED, stop_reason)
        return self._convert(done)

    def _scheduler_of(self, request_id: str) -> Scheduler:
        """The data-parallel group's scheduler that holds the request (group 0's for an unknown
        id, which every call ignores)."""
        return next((s for s in self.schedulers if request_id in s.requests), self.scheduler)

    def has_unfinished_requests(self) -> bool:
        return any(s.has_unfinished_requests() for s in self.schedulers)

    def stats(self) -> EngineStats:
        """Load of all data-parallel groups together (KV usage: their mean)."""
        used = sum(p.num_usable_blocks - p.num_free_blocks
                   for s in self.schedulers
                   for p in (*s.block_manager.pools.values(), s.block_manager.state_pool))
        return EngineStats(sum(s.num_running for s in self.schedulers),
                           sum(s.num_waiting for s in self.schedulers),
                           sum(s.block_manager.usage() for s in self.schedulers)
                           / len(self.schedulers), used,
                           sum(s.num_preemptions for s in self.schedulers),
                           self._num_prompt_tokens, self._num_generation_tokens,
                           sum(s.num_prefix_queries for s in self.schedulers),
                           sum(s.num_prefix_hits for s in self.schedulers),
                           sum(s.num_spec_rows for s in self.schedulers),
                           sum(s.num_draft_tokens for s in self.schedulers),
                           sum(s.num_accepted_tokens for s in self.schedulers),
                           tuple(map(sum, zip(*(s.accepted_per_position
                                                for s in self.schedulers)))))

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        batches = [s.schedule() for s in self.schedulers]
        if all(b.is_empty for b in batches):
            return []
        if len(self.structured):
            if self.workers is None:  # masks computed while the model runs
                batches[0].grammar = self.structured.prepare_async(batches[0])
            else:  # the masks travel to the ranks with the batches
                for batch in batches:
                    batch.grammar = self.structured.prepare(batch)
        if self.workers is not None and self.workers.failure():
            raise self._fail_all(self.workers.explain(RuntimeError("worker gone")))
        try:
            if self.workers is None:
                try:
                    results = [self.runner.execute(batches[0])]
                finally:  # the matchers must be idle before the requests change
                    if isinstance(batches[0].grammar, Future):
                        batches[0].grammar.exception()
            else:
                results = self.workers.run_step(self.runner, batches)
        except Exception as exc:
            if self.workers is not None:  # a rank may be gone: nothing can run any more
                raise self._fail_all(self.workers.explain(exc)) from exc
            # fail this step's requests only; everything else keeps going next step
            failed = [r for r in batches[0].req_ids if r in self._params]
            for request_id in failed:
                self.abort_request(request_id)
            raise StepError(failed, exc) from exc
        outputs = []
        for scheduler, batch, result in zip(self.schedulers, batches, results):
            if not batch.is_empty:
                outputs += self._finish_step(scheduler, batch, result)
        return outputs

    def _finish_step(self, scheduler: Scheduler, batch: ScheduledBatch, result: StepResult
                     ) -> list[EngineOutput]:
        """Apply one group's step result: logprobs, counters, the scheduler's update."""
        sampled, out, prompt_lps, drafts = result
        for request_id, (start, t) in prompt_lps.items():
            self._collect_prompt_logprobs(request_id, start, t)
        self._num_prompt_tokens += sum(  # prompt positions computed this step
            max(0, min(len(ids), len(prompt) - start))
            for prompt, start, ids in zip(batch.prompt_token_ids, batch.num_computed_tokens,
                                          batch.token_ids))
        step_outputs = scheduler.update_from_output(batch, sampled, draft_token_ids=drafts)
        self._num_generation_tokens += sum(len(so.new_token_ids) for so in step_outputs)
        rows, first = {}, 0  # request id -> its first logprobs row (one per new token)
        for i in batch.sample_indices:
            rows[batch.req_ids[i]] = first
            first += len(sampled[i])
        return self._convert(step_outputs, out, rows)

    def failure(self) -> str | None:
        """Why this engine cannot serve any more (a worker rank died), or None."""
        return self.workers.failure() if self.workers is not None else None

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the worker processes of a multi-process engine (nothing to do otherwise);
        graceful=False when another thread may still be in a step: the workers are ended
        without a stop message."""
        if self.workers is not None:
            self.workers.shutdown(graceful=graceful)

    def _fail_all(self, error: WorkerDiedError) -> WorkerDiedError:
        """Abort every request (their blocks are freed) and stop the workers."""
        for request_id in list(self._params):
            self.abort_request(request_id)
        if self.workers is not None:
            self.workers.shutdown(timeout=1.0)
        return error

    def _collect_prompt_logprobs(self, request_id: str, start: int, t: LogprobsTensors) -> None:
        """Keep the prompt logprobs of positions start.. not collected before (a request that
        was preempted recomputes its prompt; its first pass already counted, and once the
        first token went out there is nothing left to collect)."""
        have = self._prompt_lps.get(request_id)
        if have is None:
            return
        skip = len(have) - start  # rows already collected
        if 0 <= skip < t.token_ids.shape[0]:
            have.extend(_token_logprobs(t, slice(skip, None),
                                        self._params[request_id].prompt_logprobs or 0))

    def _convert(self, step_outputs: list[StepOutput], out: SamplerOutput | None = None,
                 rows: dict[str, int] | None = None) -> list[EngineOutput]:
        results = []
        for so in step_outputs:
            params = self._params.get(so.request_id)
            if params is None:
                continue
            lps = None
            k = (rows or {}).get(so.request_id)
            if (out is not None and out.logprobs is not None and k is not None
                    and so.new_token_ids and params.logprobs is not None):
                lps = _token_logprobs(out.logprobs, slice(k, k + len(so.new_token_ids)),
                                      params.logprobs)
            prompt_lps = None
            if so.new_token_ids and so.request_id in self._prompt_lps:
                prompt_lps = [None, *self._prompt_lps.pop(so.request_id)]
            results.append(EngineOutput(so.request_id, so.new_token_ids, so.finished,
                                        so.finish_reason, so.stop_reason, lps, prompt_lps,
                                        so.num_cached_tokens))
            if so.finished:
                self._params.pop(so.request_id, None)
                self.structured.remove(so.request_id)
                self._prompt_lps.pop(so.request_id, None)
        return results
