"""Generation: run the choices of one API request on AsyncLLM and merge their text deltas.

Choices are prompts x n (``dsv4.input_processor.fan_out``: choice c is prompt c // n with
seed + c % n), each its own engine request, turned into text by the shared output processing
(``dsv4.output_processor.CompletionState``: incremental detokenization, stop strings, logprobs;
a matched stop string ends the engine request through ``AsyncLLM.finish``). A choice may follow
a ``Plan`` (``dsv4.server.grammar``): phases of forced tokens and generation, where each phase is
a new engine request whose prompt is the original prompt plus the output so far. Forced tokens
are part of the output (counted, detokenized, logprob 0 = probability 1 under the constraint).
Closing the stream (client gone) cancels every choice, which aborts its engine request and
frees its cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from dsv4.async_llm import AsyncLLM
from dsv4.engine.outputs import TokenLogprobs
from dsv4.input_processor import fan_out
from dsv4.output_processor import Delta, RequestState
from dsv4.sampling_params import SamplingParams
from dsv4.server.metrics import RequestStats
from dsv4.tokenizer import Tokenizer

__all__ = ["Delta", "Generation", "Phase", "Plan"]


@dataclass
class Phase:
    """One step of a plan: force ``force_ids``, then (if ``generate``) sample until done."""

    force_ids: list[int] = field(default_factory=list)
    generate: bool = True
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end this phase
    drop_ids: tuple[int, ...] = ()  # a final token in this set is removed from the output
    hidden: bool = False  # sample but do not emit; the plan reads the ids in next()
    hidden_until: str | None = None  # hidden phase: stop once the text holds this
    max_tokens: int | None = None  # cap for this phase (within the request's budget)
    reserve: int = 0  # budget to leave for later phases (this phase still gets >= 1 token)


class Plan(Protocol):
    def start(self) -> Phase: ...

    def next(self, token_ids: list[int], finish_reason: str | None,
             stop_reason: int | str | None) -> Phase | None: ...


class Generation:
    """All choices of one request; iterate ``stream()`` once."""

    def __init__(self, llm: AsyncLLM, tokenizer: Tokenizer, prompts: list[list[int]],
                 params: SamplingParams, request_id: str, stats: RequestStats | None = None,
                 plan_factory: Callable[[], Plan] | None = None) -> None:
        assert params.max_tokens is not None, "the server always sets max_tokens"
        self.llm, self.tokenizer = llm, tokenizer
        self.prompts, self.params, self.request_id = prompts, params, request_id
        self.stats, self.plan_factory = stats, plan_factory
        self.choices = fan_out(request_id, params, len(prompts))
        self.state = RequestState(request_id, tokenizer, self.choices, prompts)
        self.num_choices = len(self.choices)

    async def stream(self) -> AsyncIterator[Delta]:
        """Deltas of all choices as they come; raises what a choice raised
        (InvalidRequestError: the engine refused the request before any output)."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._guard(i, queue)) for i in range(self.num_choices)]
        open_choices = self.num_choices  # counted on delivery: a choice's state finishes first
        try:
            while open_choices:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    open_choices -= 1
                if self.stats is not None:
                    self.stats.on_tokens(len(item.token_ids))
                    if item.finished:
                        self.stats.on_finish(item.finish_reason)
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guard(self, index: int, queue: asyncio.Queue) -> None:
        try:
            await _Choice(self, index, queue.put_nowait).run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(exc)


class _Choice:
    """One choice: its phases and budget over its CompletionState."""

    def __init__(self, gen: Generation, index: int, put: Callable[[Delta], None]) -> None:
        self.gen, self.index, self.put = gen, index, put
        choice = gen.choices[index]
        self.prompt_ids = gen.prompts[choice.prompt_index]
        self.params = choice.params
        self.budget: int = self.params.max_tokens or 0
        self.completion = gen.state.completions[index]

    @property
    def out(self) -> list[int]:
        return self.completion.token_ids

    def emit(self, ids: list[int], lps: list[TokenLogprobs] | None,
             prompt_lps: list[TokenLogprobs | None] | None = None,
             num_cached_tokens: int | None = None) -> None:
        self.put(self.completion.add(ids, lps, prompt_lps, num_cached_tokens))

    async def run(self) -> None:
        gen = self.gen
        plan = gen.plan_factory() if gen.plan_factory is not None else None
        phase: Phase | None = plan.start() if plan is not None else Phase()
        reason: str | None = "stop"
        stop_reason: int | str | None = None
        step = 0
        while phase is not None:
            if phase.force_ids:
                ids = phase.force_ids[:self.budget - len(self.out)]
                lps = ([TokenLogprobs(t, 0.0, 1, []) for t in ids]
                       if self.params.logprobs is not None else None)
                self.emit(ids, lps)
                if self.completion.stopped is not None or len(self.out) >= self.budget:
                    reason = "stop" if self.completion.stopped is not None else "length"
                    break
            if not phase.generate:
                break
            rid = gen.choices[self.index].request_id + (f".{step}" if step else "")
            step += 1
            ids, reason, stop_reason = await self._generate(rid, phase)
            if self.completion.stopped is not None or len(self.out) >= self.budget:
                break
            phase = plan.next(ids, reason, stop_reason) if plan is not None else None
        self.put(self.completion.finish(reason, stop_reason))

    async def _generate(self, rid: str, phase: Phase
                        ) -> tuple[list[int], str | None, int | str | None]:
        """One engine request for ``phase``: (its token ids, finish reason, stop reason)."""
        left = self.budget - len(self.out)
        cap = max(1, left - phase.reserve)
        if phase.max_tokens is not None:
            cap = min(cap, phase.max_tokens)
        stop_ids = list(self.params.stop_token_ids or []) + phase.stop_token_ids
        # what is left of min_tokens (a phase ended by structural ids, a tool-call plan's
        # reasoning, keeps its own stops); prompt logprobs only over the request's own prompt
        floor = 0 if phase.stop_token_ids else max(0, self.params.min_tokens - len(self.out))
        params = dataclasses.replace(
            self.params, max_tokens=cap, stop_token_ids=stop_ids, min_tokens=min(floor, cap),
            prompt_logprobs=None if self.out else self.params.prompt_logprobs)
        ids: list[int] = []
        reason: str | None = None
        stop_reason: int | str | None = None
        stream = self.gen.llm.generate(self.prompt_ids + self.out, params, request_id=rid)
        async with aclosing(stream):
            async for o in stream:
                new, lps = list(o.new_token_ids), o.logprobs
                if o.finished:
                    reason, stop_reason = o.finish_reason, o.stop_reason
                    if new and new[-1] in phase.drop_ids:
                        new, lps = new[:-1], (lps[:-1] if lps else lps)
                ids.extend(new)
                if phase.hidden:
                    if phase.hidden_until and phase.hidden_until in self.gen.tokenizer.decode(
                            ids):
                        return ids, "stop", None
                    continue
                if new:
                    self.emit(new, lps, o.prompt_logprobs, o.num_cached_tokens)
                if self.completion.stopped is not None and not o.finished:
                    self.gen.llm.finish(rid, self.completion.stopped)
                    return ids, "stop", self.completion.stopped
        return ids, reason, stop_reason
