"""Generation: run the choices of one API request on AsyncLLM and merge their text deltas.

Choices are prompts x n (``dsv4.input_processor.fan_out``: choice c is prompt c // n with
seed + c % n), each its own engine request, turned into text by the shared output processing
(``dsv4.output_processor.CompletionState``: incremental detokenization, stop strings, logprobs;
a matched stop string ends the engine request through ``AsyncLLM.finish``). Forced tool calls
and other output constraints are grammars the engine applies (``structured_outputs``), not
extra requests. Closing the stream (client gone) cancels every choice, which aborts its engine
request and frees its cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from dsv4.async_llm import AsyncLLM
from dsv4.input_processor import fan_out
from dsv4.output_processor import Delta, RequestState
from dsv4.sampling_params import SamplingParams
from dsv4.server.metrics import RequestStats
from dsv4.tokenizer import Tokenizer

__all__ = ["Delta", "Generation"]


class Generation:
    """All choices of one request; iterate ``stream()`` once."""

    def __init__(self, llm: AsyncLLM, tokenizer: Tokenizer, prompts: list[list[int]],
                 params: SamplingParams, request_id: str, stats: RequestStats | None = None
                 ) -> None:
        assert params.max_tokens is not None, "the server always sets max_tokens"
        self.llm, self.tokenizer = llm, tokenizer
        self.prompts, self.params, self.request_id = prompts, params, request_id
        self.stats = stats
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
    """One choice: one engine request over its CompletionState."""

    def __init__(self, gen: Generation, index: int, put: Callable[[Delta], None]) -> None:
        self.gen, self.index, self.put = gen, index, put
        choice = gen.choices[index]
        self.prompt_ids = gen.prompts[choice.prompt_index]
        self.params = choice.params
        self.request_id = choice.request_id
        self.completion = gen.state.completions[index]

    async def run(self) -> None:
        reason: str | None = None
        stop_reason: int | str | None = None
        stream = self.gen.llm.generate(self.prompt_ids, self.params, request_id=self.request_id)
        async with aclosing(stream):
            async for o in stream:
                if o.finished:
                    reason, stop_reason = o.finish_reason, o.stop_reason
                if o.new_token_ids:
                    self.put(self.completion.add(list(o.new_token_ids), o.logprobs,
                                                 o.prompt_logprobs, o.num_cached_tokens))
                if self.completion.stopped is not None and not o.finished:
                    self.gen.llm.finish(self.request_id, self.completion.stopped)
                    reason, stop_reason = "stop", self.completion.stopped
                    break
        self.put(self.completion.finish(reason, stop_reason))
