"""Scheduler: continuous batching on one token budget (vLLM v1 style), CPU only.

Each ``schedule()`` fills ``max_num_batched_tokens`` so that a short request is not stuck behind
a long prompt: running decodes first, then running prefill chunks (a request just advances
``num_computed_tokens`` toward ``num_tokens``) up to ``long_prefill_token_threshold`` tokens,
then waiting requests FCFS while ``max_num_seqs`` allows (each at most the threshold, so a short
prompt fits whole next to a long one), and what is left tops up the unfinished prefills. A long
prefill thus advances every step and takes the whole budget when nobody else wants it. When
blocks run out, the most recently admitted running request is preempted (blocks freed, recomputed
later, put at the front of the queue); no request is ever dropped. ``update_from_output`` appends
sampled tokens, applies stop conditions, registers newly full blocks in the prefix cache and
frees finished requests. A request that starts (or restarts after preemption) first takes the
longest cached prefix of its tokens (``BlockManager.find_cached_prefix``) and computes only the
rest. Not thread-safe: call ``add_request`` / ``abort_requests`` between steps. It never
touches tensors or text.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from dsv4.cache.block_manager import NO_PREFIX, BlockManager, CachedPrefix
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.request import Request, RequestStatus, StepOutput
from dsv4.errors import InvalidRequestError

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the request queues; the BlockManager owns the blocks they hold."""

    def __init__(self, engine_config: EngineConfig, block_manager: BlockManager,
                 long_prefill_token_threshold: int | None = None) -> None:
        self.config = engine_config
        self.block_manager = block_manager
        # the most tokens prefills take in a step before waiting requests are considered (and
        # the most one waiting request takes at admission); None: half the budget. A value >=
        # max_num_batched_tokens gives the old order: a running prefill takes the whole budget.
        if long_prefill_token_threshold is None:
            long_prefill_token_threshold = max(1, engine_config.max_num_batched_tokens // 2)
        if not isinstance(long_prefill_token_threshold, int) or long_prefill_token_threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be a positive integer, got "
                             f"{long_prefill_token_threshold!r}")
        self.long_prefill_token_threshold = long_prefill_token_threshold
        # a running request needs a compressor-state slot: the memory plan may give fewer
        self.max_num_seqs = min(engine_config.max_num_seqs, block_manager.num_state_slots)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; preemption takes from the end
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._finished_req_ids: list[str] = []  # since the last schedule()
        self._preempted_req_ids: list[str] = []
        self.num_preemptions = 0  # since start
        # prefix cache: tokens looked up and tokens found, at every admission (vLLM's counters)
        self.num_prefix_queries = self.num_prefix_hits = 0
        # speculative decoding since start: rows that verified drafts, drafts verified, drafts
        # accepted, and accepted ones by draft position (vLLM's spec-decode counters)
        self.num_spec_rows = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * engine_config.num_speculative_tokens

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage()

    # ---- intake ----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a validated request (see ``dsv4.sampling_params.validate_prompt``); raises
        InvalidRequestError for one that could never fit the KV cache."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                      param="request_id")
        max_tokens = request.sampling_params.max_tokens
        max_len = self.config.max_model_len
        if max_tokens is not None:
            max_len = min(max_len, request.num_tokens + max_tokens)
        if not self.block_manager.can_fit(max_len, self.config.max_num_batched_tokens):
            raise InvalidRequestError(
                f"request {request.request_id!r} of up to {max_len} tokens can never fit the "
                f"KV cache; lower max_tokens or give the cache more memory", param="max_tokens")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(
        self,
        request_ids: str | Iterable[str],
        status: RequestStatus,
        stop_reason: int | str | None = None,
    ) -> list[StepOutput]:
        """End requests now, wherever they are, and free their blocks. The detokenizer uses
        this with FINISHED_STOPPED when a stop string matches; aborts use FINISHED_ABORTED.
        Unknown or already finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished status")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            if stop_reason is not None:
                req.stop_reason = stop_reason
            self._free_finished(req, status)
            outputs.append(StepOutput(request_id, [], True, req.finish_reason, req.stop_reason))
        return outputs

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[StepOutput]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Pick this step's requests and token counts; allocate their blocks; advance their
        ``num_computed_tokens`` by the tokens scheduled (the runner computes them this step).

        Three passes over one token budget: (1) every running decode, then the running prefills
        (oldest first) up to ``long_prefill_token_threshold`` tokens between them, so a long
        prefill always advances; (2) waiting requests FCFS, each at most the threshold, so a
        short prompt fits whole beside a long one; (3) whatever budget is left tops up the
        unfinished prefills, oldest first. Rows come out in admission order."""
        plan = _StepPlan(self.config.max_num_batched_tokens)
        preempted = False
        decodes = [(r, False) for r in self.running if self._num_left(r) == 1]
        prefills = [(r, True) for r in self.running if self._num_left(r) > 1]
        share = self.long_prefill_token_threshold  # running prefills' tokens before admission
        for n, (req, is_prefill) in enumerate(decodes + prefills):
            if plan.budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this pass
            num_new = min(self._num_left(req), plan.budget)
            if is_prefill:
                num_new = min(num_new, share)
                if num_new == 0:
                    continue  # an older prefill took the share; pass (3) may top it up
                share -= num_new
            elif req.spec_token_ids:  # verify last step's drafts with the new token; the
                # decodes after this one keep a token each
                drafts = self._usable_drafts(req, plan.budget - len(decodes) + n)
                if drafts and self.block_manager.allocate(
                        req.request_id, req.num_computed_tokens, 1 + len(drafts)):
                    plan.add(req, 1 + len(drafts), drafts)
                    continue
            preempted |= not self._allocate_running(plan, req, num_new)
        # admit waiting requests, unless this step had to preempt (avoid thrashing)
        while (not preempted and self.waiting and plan.budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting[0]
            prefix = self._cached_prefix(req)
            num_new = min(req.num_tokens - prefix.num_tokens, self.long_prefill_token_threshold,
                          plan.budget)
            if not self.block_manager.allocate(req.request_id, prefix.num_tokens, num_new,
                                               prefix):
                break  # FCFS: later requests wait behind the head
            self.waiting.popleft()
            self._admit(req, prefix)
            plan.add(req, num_new)
        # top up unfinished prefills (the admitted ones too) with what is left; never preempts
        for req in self.running:
            if plan.budget == 0:
                break
            have = plan.tokens.get(req.request_id, 0)
            more = min(self._num_left(req) - have, plan.budget)
            if more > 0 and self.block_manager.allocate(
                    req.request_id, req.num_computed_tokens, have + more):
                plan.add(req, more)
        return self._make_batch([(r, plan.tokens[r.request_id],
                                  plan.drafts.get(r.request_id, []))
                                 for r in self.running if r.request_id in plan.tokens])

    def _cached_prefix(self, req: Request) -> CachedPrefix:
        """The longest cached prefix a waiting request can start after: whole blocks, at least
        one token left to compute (its logits give the next token); none for a request that
        wants prompt logprobs (they need the prompt's hidden states)."""
        bm = self.block_manager
        if not bm.caching or req.sampling_params.prompt_logprobs is not None:
            return NO_PREFIX
        return bm.find_cached_prefix(self._hashes(req), req.num_tokens - 1)

    def _hashes(self, req: Request) -> list[bytes]:
        """The request's block hashes, extended to its full blocks so far."""
        return self.block_manager.hash_blocks(req.block_hashes, req.all_token_ids,
                                              req.sampling_params.cache_salt)

    def cached_prefix_tokens(self, req: Request) -> int:
        """Tokens of ``req`` this scheduler's cache could skip now (0 with caching off)."""
        return self._cached_prefix(req).num_tokens

    def _admit(self, req: Request, prefix: CachedPrefix) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        req.num_computed_tokens = prefix.num_tokens
        req.boundary_block = prefix.boundary_block
        if self.block_manager.caching:
            self.num_prefix_queries += req.num_tokens
            self.num_prefix_hits += prefix.num_tokens
        if req.num_cached_tokens is None:  # what the API reports: the first admission's hit
            req.num_cached_tokens = min(prefix.num_tokens, req.num_prompt_tokens)

    def _allocate_running(self, plan: _StepPlan, req: Request, num_new: int) -> bool:
        """Blocks for ``num_new`` more tokens of running ``req``, preempting the latest admitted
        requests (unscheduling them if this step already had them) until they fit. Returns
        False when something was preempted."""
        have = plan.tokens.get(req.request_id, 0)
        clean = True
        while not self.block_manager.allocate(req.request_id, req.num_computed_tokens,
                                              have + num_new):
            victim = self.running.pop()
            plan.drop(victim)
            self._preempt(victim)
            clean = False
            if victim is req:
                return False
        plan.add(req, num_new)
        return clean

    @staticmethod
    def _num_left(req: Request) -> int:
        return req.num_tokens - req.num_computed_tokens

    def _usable_drafts(self, req: Request, budget: int) -> list[int]:
        """The request's drafts that can still matter: within the step's budget, and short
        enough that all of them plus the bonus token fit max_tokens and max_model_len."""
        room = min(budget, self.config.max_model_len - req.num_tokens)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - req.num_output_tokens - 1)
        return req.spec_token_ids[:max(0, room)]

    def _num_to_propose(self, req: Request, num_new: int) -> int:
        """Drafts the runner's MTP block should propose for ``req`` after a step that computes
        ``num_new`` tokens of it (drafts included) and samples: up to num_speculative_tokens,
        fewer where blocks are short for the positions deeper drafts write past the step (up
        to K - 1)."""
        k = self.config.num_speculative_tokens
        if not k:
            return 0
        start = req.num_computed_tokens
        k = min(k, max(1, self.config.max_model_len - start - num_new))
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:  # the step adds at least one output token; the next
            # can use at most max_tokens - outputs - 1 drafts (the last token is the bonus)
            k = min(k, max_tokens - req.num_output_tokens - 2)
            if k < 1:
                return 0
        while k > 1 and not self.block_manager.allocate(req.request_id, start, num_new + k - 1):
            k -= 1
        return k

    def _make_batch(self, scheduled: list[tuple[Request, int, list[int]]]) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch(
            block_tables={kind: [] for kind in bm.specs},
            finished_req_ids=self._finished_req_ids,
            preempted_req_ids=self._preempted_req_ids,
        )
        self._finished_req_ids, self._preempted_req_ids = [], []
        speculating = self.config.num_speculative_tokens > 0
        if speculating:
            batch.step_seed = random.getrandbits(62)
        for req, num_new, drafts in scheduled:
            start = req.num_computed_tokens
            end = start + num_new - len(drafts)  # the known tokens scheduled end here
            sample = end == req.num_tokens
            batch.req_ids.append(req.request_id)
            batch.token_ids.append(req.all_token_ids[start:end] + drafts)
            batch.num_computed_tokens.append(start)
            if speculating:
                batch.num_draft_tokens.append(len(drafts))
                batch.num_propose_tokens.append(
                    self._num_to_propose(req, num_new) if sample else 0)
                batch.next_token_ids.append(-1 if sample else req.all_token_ids[end])
            for kind, table in bm.block_tables(req.request_id).items():
                batch.block_tables[kind].append(table)
            batch.swa_block_offsets.append(bm.swa_block_offset(req.request_id))
            batch.state_slots.append(bm.state_slot(req.request_id))
            batch.boundary_blocks.append(req.boundary_block)
            req.boundary_block = 0  # loaded by this step
            req.num_computed_tokens = start + num_new  # drafts included until verified
            batch.do_sample.append(sample)
            batch.sampling_params.append(req.sampling_params)
            batch.num_output_tokens.append(req.num_output_tokens)
            batch.prompt_token_ids.append(req.prompt_token_ids)
            batch.output_token_ids.append(req.output_token_ids)
            batch.eos_token_ids.append(req.eos_token_id)
        return batch

    def update_from_output(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: Sequence[Sequence[int]],
        logprobs: Sequence[Any] | None = None,
        draft_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[StepOutput]:
        """Apply the runner's result for ``batch``.

        ``sampled_token_ids[i]`` lists the new tokens of row i: one per sampling row, or for a
        row that verified k drafts its accepted drafts and one more (1 .. k + 1 tokens); empty
        for rows that did not sample. Rejected drafts are forgotten here (the runner rolled
        their cache state back): the request's computed tokens end after its accepted ones.
        Stop conditions are checked token by token, so nothing after a stop is kept.
        ``draft_token_ids[i]`` are the drafts proposed for row i's next step.
        ``logprobs[i]`` (optional, opaque) is passed through to the StepOutput. Returns one
        StepOutput per request that got tokens; finished requests are freed here.
        """
        if len(sampled_token_ids) != batch.num_reqs:
            raise ValueError(f"{len(sampled_token_ids)} sampled rows for {batch.num_reqs} requests")
        outputs = []
        any_finished = False
        bm = self.block_manager
        for i, request_id in enumerate(batch.req_ids):
            req = self.requests.get(request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted during the step
            num_drafts = batch.num_drafts(i)
            new_ids: list[int] = []
            status = None
            if batch.do_sample[i]:
                if not sampled_token_ids[i]:
                    raise ValueError(f"row {i} ({request_id!r}) should have sampled a token")
                if num_drafts:  # computed: the row's first token and the accepted drafts
                    accepted = len(sampled_token_ids[i]) - 1
                    self._count_acceptance(num_drafts, accepted)
                    req.num_computed_tokens -= num_drafts - accepted
                for token_id in sampled_token_ids[i]:
                    req.append_output_token_ids(int(token_id))
                    new_ids.append(int(token_id))
                    status = req.check_stop(self.config.max_model_len)
                    if status is not None:
                        break
            if bm.caching:  # the step filled these blocks: later requests may reuse them
                bm.cache_blocks(request_id, self._hashes(req),
                                min(req.num_computed_tokens, req.num_tokens))
            if not batch.do_sample[i]:
                continue  # a prefill chunk that samples nothing
            if status is not None:
                self._free_finished(req, status)
                any_finished = True
            else:
                req.spec_token_ids = list(draft_token_ids[i]) if draft_token_ids else []
                self.block_manager.release_swa_blocks(request_id, req.num_computed_tokens)
            outputs.append(StepOutput(
                request_id, new_ids, req.is_finished, req.finish_reason, req.stop_reason,
                logprobs[i] if logprobs is not None else None, req.num_cached_tokens,
            ))
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _count_acceptance(self, num_drafts: int, accepted: int) -> None:
        self.num_spec_rows += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    # ---- helpers ---------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req.request_id)
        req.spec_token_ids = []  # its MTP cache is gone too; the recompute drafts anew
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0  # recompute prompt + output so far
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)  # preempted requests come back first
        self._preempted_req_ids.append(req.request_id)
        logger.debug("preempted %s", req)

    def _free_finished(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.block_manager.free(req.request_id)
        del self.requests[req.request_id]
        self._finished_req_ids.append(req.request_id)


class _StepPlan:
    """Tokens given to each request so far in one ``schedule()`` call, and the budget left."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.tokens: dict[str, int] = {}
        self.drafts: dict[str, list[int]] = {}  # draft tokens among a request's tokens

    def add(self, req: Request, num_new: int, drafts: list[int] | None = None) -> None:
        self.tokens[req.request_id] = self.tokens.get(req.request_id, 0) + num_new
        self.budget -= num_new
        if drafts:
            self.drafts[req.request_id] = drafts

    def drop(self, req: Request) -> None:
        """Unschedule a request preempted after it was given tokens: its budget comes back."""
        self.budget += self.tokens.pop(req.request_id, 0)
        self.drafts.pop(req.request_id, None)
