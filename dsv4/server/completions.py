"""POST /v1/completions: raw prompts (text or token ids) in, raw text out; no chat format.

A text prompt is tokenized as is (the V4 tokenizer adds no BOS: write ``<｜begin▁of▁sentence｜>``
yourself for a fresh document). A list of prompts gives ``len(prompts) * n`` choices, choice
``p * n + j`` for prompt p. ``logprobs`` uses the legacy completions shape (tokens,
token_logprobs, top_logprobs, text_offset); with ``echo`` the prompt's tokens come first, each
scored given the ones before it (the first has None), as evaluation harnesses expect.
``suffix`` (FIM) is rejected.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dsv4.engine.outputs import TokenLogprobs
from dsv4.output_processor import Delta
from dsv4.server.generation import Generation
from dsv4.server.metrics import RequestStats
from dsv4.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    reject_unsupported,
)
from dsv4.server.state import ServerState
from dsv4.server.structured import structured_spec
from dsv4.server.validation import check_prompt_batch, check_sampling

__all__ = ["CompletionRun", "prepare_completion"]


def _prompts(state: ServerState, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """-> (token ids per prompt, text per prompt for echo)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompt = [prompt]
    ids_list: list[list[int]] = []
    texts: list[str] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids_list.append(state.processor.tokenize(p, "prompt"))
            texts.append(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
            state.check_token_ids(p, "prompt")
            ids_list.append(list(p))
            texts.append(state.tokenizer.decode(list(p)))
        else:
            raise APIError(400, f"prompt[{i}] must be a string or a list of token ids",
                           param="prompt")
    if any(not ids for ids in ids_list):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return ids_list, texts


def prepare_completion(state: ServerState, req: CompletionRequest) -> CompletionRun:
    """Validate and tokenize a completions request (synchronous: the app runs it in a worker
    thread); raises APIError / InvalidRequestError (4xx) before any work starts."""
    reject_unsupported(req)
    check_sampling(req)
    check_prompt_batch(req.prompt, req.n, state.max_model_len)
    model = state.check_model(req.model)
    spec = structured_spec(req, state.grammar)
    ids_list, texts = _prompts(state, req.prompt)
    params = state.sampling_params(req, ids_list, max_tokens=req.max_tokens,
                                   logprobs=req.logprobs,
                                   skip_special_tokens=req.skip_special_tokens,
                                   prompt_field="prompt", structured_outputs=spec)
    if req.echo and req.logprobs is not None:  # the prompt's logprobs lead the choice's
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    stats = RequestStats(state.metrics, sum(len(ids) for ids in ids_list))
    gen = Generation(state.llm, state.tokenizer, ids_list, params, rid, stats)
    return CompletionRun(state, req, gen, model, texts)


class CompletionRun:
    def __init__(self, state: ServerState, req: CompletionRequest, gen: Generation, model: str,
                 texts: list[str]) -> None:
        self.state, self.req, self.gen, self.model = state, req, gen, model
        n = req.n
        self.echo = [texts[i // n] if req.echo else "" for i in range(gen.num_choices)]
        self.texts = [""] * gen.num_choices
        self.num_tokens = [0] * gen.num_choices
        self.logprobs = [CompletionLogprobs() for _ in range(gen.num_choices)]
        # with echo + logprobs the offsets start at the prompt (its tokens are listed too)
        self.offsets = [0 if req.logprobs is not None else len(e) for e in self.echo]
        self.finish = [None] * gen.num_choices
        self.created = int(time.time())

    def _consume(self, d: Delta) -> tuple[str, CompletionLogprobs | None]:
        text = d.text
        if self.echo[d.index] and not self.num_tokens[d.index] and not self.texts[d.index]:
            text = self.echo[d.index] + text
        self.texts[d.index] += text
        self.num_tokens[d.index] += len(d.token_ids)
        if d.finished:
            self.finish[d.index] = d.finish_reason
        lps: list[TokenLogprobs | None] = list(d.logprobs or [])
        if self.echo[d.index] and d.prompt_logprobs:
            lps = [*d.prompt_logprobs, *lps]
        if self.req.logprobs is None or not lps:
            return text, None
        first = self.gen.prompts[d.index // self.req.n][0]
        return text, self._logprobs(d.index, lps, first)

    def _logprobs(self, index: int, lps: list[TokenLogprobs | None],
                  first_prompt_token: int) -> CompletionLogprobs:
        """Legacy logprobs for these tokens; None stands for the first prompt token (echo)."""
        token_text = self.state.token_text
        part = CompletionLogprobs()
        for t in lps:
            tok = token_text(first_prompt_token if t is None else t.token_id)
            part.tokens.append(tok)
            part.token_logprobs.append(None if t is None else max(t.logprob, -9999.0))
            part.top_logprobs.append(None if t is None else {
                token_text(i): max(lp, -9999.0) for i, lp in t.top[:self.req.logprobs or 0]})
            part.text_offset.append(self.offsets[index])
            self.offsets[index] += len(tok)
        whole = self.logprobs[index]
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(whole, name).extend(getattr(part, name))
        return part

    def usage(self) -> Usage:
        firsts = range(0, self.gen.num_choices, self.req.n)  # one choice per prompt
        prompt = sum(len(self.gen.prompts[i // self.req.n]) for i in firsts)
        cached = sum(self.gen.state.completions[i].num_cached_tokens or 0 for i in firsts)
        return Usage.of(prompt, sum(self.num_tokens), cached_tokens=cached)

    async def collect(self, stream: AsyncIterator[Delta]) -> CompletionResponse:
        async for d in stream:
            self._consume(d)
        choices = [CompletionChoice(index=i, text=self.texts[i], finish_reason=self.finish[i],
                                    logprobs=self.logprobs[i] if self.req.logprobs is not None
                                    else None)
                   for i in range(self.gen.num_choices)]
        return CompletionResponse(id=self.gen.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=self.usage())

    def chunks(self, d: Delta) -> list[dict[str, Any]]:
        text, logprobs = self._consume(d)
        if not text and logprobs is None and not d.finished:
            return []
        choice = CompletionChoice(index=d.index, text=text, logprobs=logprobs,
                                  finish_reason=d.finish_reason if d.finished else None)
        return [self._chunk([choice])]

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], self.usage())

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None
               ) -> dict[str, Any]:
        return CompletionResponse(id=self.gen.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage).dump()
