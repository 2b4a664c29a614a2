"""POST /v1/chat/completions: request -> DeepSeek-V4 prompt -> choices -> response or SSE.

Thinking is on by default (DeepSeek's API; ``dsv4 serve --default-thinking off`` flips that for
requests that do not say); every request spelling is mapped by ``dsv4.encoding_request``. The
output parser's start state comes from the rendered prompt, so reasoning, content and tool calls
are split the same way in both modes; with ``tool_choice: "none"`` (or no tools) DSML is still
stripped from content but never reported as a call. ``auto``, ``required`` and a named function generate under the tool-call grammar of
``dsv4.server.grammar`` (``auto``: text, or text then a call); ``response_format`` / ``structured_outputs`` under theirs
(``dsv4.server.structured``). Tool-call ids are ``call_<24 hex>``; ``finish_reason`` is
``tool_calls`` when a call was reported and the output was not cut by the length limit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from dsv4.encoding_tokens import THINK_CLOSE
from dsv4.engine.outputs import TokenLogprobs
from dsv4.output_processor import Delta
from dsv4.server.generation import Generation
from dsv4.server.grammar import (any_strict, resolve_tool_choice, tool_call_grammar,
                                 tool_schemas)
from dsv4.server.metrics import RequestStats
from dsv4.server.parsers import (
    CONTENT,
    REASONING,
    TOOL_ARGS,
    TOOL_CALL,
    DSV4OutputParser,
    ParserEvent,
    prompt_ends_in_reasoning,
)
from dsv4.server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    reject_unsupported,
)
from dsv4.server.state import ServerState
from dsv4.server.structured import structured_spec, tool_spec, with_response_format
from dsv4.server.validation import check_messages, check_sampling, check_tools

__all__ = ["ChatRun", "prepare_chat", "render_chat_prompt"]

_ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


def render_chat_prompt(state: ServerState, raw: dict[str, Any]) -> str:
    """The prompt string for a chat request body (400 naming the field on bad input)."""
    check_messages(raw.get("messages"))
    check_tools(raw.get("tools"))
    return state.processor.render_chat(with_response_format(raw),
                                       default_thinking=state.default_thinking)


def prepare_chat(state: ServerState, req: ChatCompletionRequest,
                 raw: dict[str, Any]) -> ChatRun:
    """Validate, render and tokenize a chat request; raises APIError / InvalidRequestError
    (4xx) before any work starts. Synchronous and possibly slow (a long prompt): the app runs
    it in a worker thread."""
    reject_unsupported(req)
    check_sampling(req)
    model = state.check_model(req.model)
    tools = tool_schemas(req.tools)
    tools_enabled, forced_name, force = resolve_tool_choice(req.tool_choice, list(tools))
    spec = structured_spec(req, state.grammar, tools_enabled=tools_enabled)
    if tools_enabled:
        spec = tool_spec(state.grammar, tool_call_grammar(tools, forced_name, force=force),
                         strict=force or any_strict(req.tools))
    prompt = render_chat_prompt(state, raw)
    prompt_ids = state.processor.tokenize(prompt, "messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = state.sampling_params(req, [prompt_ids], max_tokens=max_tokens,
                                   logprobs=num_logprobs, skip_special_tokens=req.ignore_eos,
                                   prompt_field="messages", structured_outputs=spec)
    thinking = prompt_ends_in_reasoning(prompt)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stats = RequestStats(state.metrics, len(prompt_ids))
    gen = Generation(state.llm, state.tokenizer, [prompt_ids], params, rid, stats)
    return ChatRun(state, req, gen, model, prompt, thinking, tools_enabled, tools)


class _ChoiceState:
    def __init__(self, prompt: str, thinking: bool, tools_enabled: bool,
                 tools: dict[str, Any]) -> None:
        self.parser = DSV4OutputParser(prompt, tools_enabled=tools_enabled, in_reasoning=thinking,
                                       tools=tools)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.call_ids: dict[int, str] = {}
        self.finish_reason: str | None = None


class ChatRun:
    """One validated chat request: drives its Generation into a response or SSE chunks."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, gen: Generation,
                 model: str, prompt: str, thinking: bool, tools_enabled: bool,
                 tools: dict[str, Any] | None = None) -> None:
        self.state, self.req, self.gen, self.model = state, req, gen, model
        self.thinking = thinking
        self.num_prompt_tokens = len(gen.prompts[0])
        self.choices = [_ChoiceState(prompt, thinking, tools_enabled, tools or {})
                        for _ in range(gen.num_choices)]
        self.created = int(time.time())
        self.think_close = state.tokenizer.token_to_id(THINK_CLOSE)
        self.top_n = req.top_logprobs or 0

    @property
    def request_id(self) -> str:
        return self.gen.request_id

    def _consume(self, delta: Delta) -> tuple[list[ParserEvent], list[TokenLogprob] | None]:
        c = self.choices[delta.index]
        c.token_ids.extend(delta.token_ids)
        events = c.parser.feed(delta.text) if delta.text else []
        lps = self._logprobs(delta.logprobs) if delta.logprobs else None
        if lps:
            c.logprobs.extend(lps)
        if delta.finished:
            events += c.parser.finish()
            reason = delta.finish_reason
            if reason != "length" and c.parser.has_tool_calls:
                reason = "tool_calls"
            c.finish_reason = reason
        return events, lps

    def events(self, delta: Delta) -> list[ParserEvent]:
        """The output parser's events for one delta (the Messages and Responses APIs build
        their own output from these; the choice's ``finish_reason`` is set on the last one)."""
        return self._consume(delta)[0]

    def _logprobs(self, lps: list[TokenLogprobs]) -> list[TokenLogprob]:
        text = self.state.token_text
        out = []
        for t in lps:
            tok = text(t.token_id)
            top = [TopLogprob(token=text(i), logprob=max(lp, -9999.0),
                              bytes=list(text(i).encode()))
                   for i, lp in t.top[:self.top_n]]
            out.append(TokenLogprob(token=tok, logprob=max(t.logprob, -9999.0),
                                    bytes=list(tok.encode()), top_logprobs=top))
        return out

    def usage(self) -> Usage:
        completion = sum(len(c.token_ids) for c in self.choices)
        reasoning = 0
        if self.thinking:
            for c in self.choices:
                ids = c.token_ids
                reasoning += ids.index(self.think_close) if self.think_close in ids else len(ids)
        cached = self.gen.state.completions[0].num_cached_tokens or 0  # the prompt is shared
        return Usage.of(self.num_prompt_tokens, completion, reasoning, cached)

    # ---- non-streaming -------------------------------------------------------------------------
    async def collect(self, stream: AsyncIterator[Delta]) -> ChatCompletionResponse:
        async for delta in stream:
            self._consume(delta)
        choices = []
        for i, c in enumerate(self.choices):
            result = c.parser.result()
            calls = [ToolCall(id=_call_id(), function=FunctionCall(**call["function"]))
                     for call in result["tool_calls"]] or None
            message = ChatMessage(
                content=result["content"] if result["content"] or not calls else None,
                reasoning_content=result["reasoning_content"] if self.thinking else None,
                tool_calls=calls)
            logprobs = ChoiceLogprobs(content=c.logprobs) if self.req.logprobs else None
            choices.append(ChatChoice(index=i, message=message, logprobs=logprobs,
                                      finish_reason=c.finish_reason))
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=self.usage())

    # ---- streaming -----------------------------------------------------------------------------
    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None
               ) -> dict[str, Any]:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=choices, usage=usage).dump()

    def first_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                          content=""))])
                for i in range(len(self.choices))]

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The SSE payloads for one delta (one per parser event, then the finish)."""
        events, lps = self._consume(delta)
        c = self.choices[delta.index]
        out = []
        for ev in events:
            message = self._delta_message(c, ev)
            if message is not None:
                out.append(ChatStreamChoice(index=delta.index, delta=message))
        if lps:
            logprobs = ChoiceLogprobs(content=lps)
            if out:
                out[0].logprobs = logprobs
            else:
                out.append(ChatStreamChoice(index=delta.index, delta=DeltaMessage(),
                                            logprobs=logprobs))
        if delta.finished:
            out.append(ChatStreamChoice(index=delta.index, delta=DeltaMessage(),
                                        finish_reason=c.finish_reason))
        return [self._chunk([choice]) for choice in out]

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], self.usage())

    @staticmethod
    def _delta_message(c: _ChoiceState, ev: ParserEvent) -> DeltaMessage | None:
        if ev.kind == REASONING:
            return DeltaMessage(reasoning_content=ev.text)
        if ev.kind == CONTENT:
            return DeltaMessage(content=ev.text)
        if ev.kind == TOOL_CALL:
            call_id = c.call_ids.setdefault(ev.index, _call_id())
            return DeltaMessage(tool_calls=[DeltaToolCall(
                index=ev.index, id=call_id, type="function",
                function=FunctionCall(name=ev.text, arguments=""))])
        if ev.kind == TOOL_ARGS:
            return DeltaMessage(tool_calls=[DeltaToolCall(
                index=ev.index, function=FunctionCall(arguments=ev.text))])
        return None  # TOOL_END


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
