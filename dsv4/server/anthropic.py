"""POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages API) over chat completions.

A Messages body is converted by ``deepseek-recipe`` (``dsv4.server.recipe``) and written as the
chat-completions request of the same conversation (``chat_body``), which ``prepare_chat``
renders, tokenizes and runs: same encoder, same tool-call grammar, same output parser.
Mapping: ``thinking`` {enabled | adaptive | disabled} -> thinking mode (absent: the server
default); ``output_config.effort`` -> ``reasoning_effort``; ``budget_tokens`` is accepted (V4
has no separate thinking budget: ``max_tokens`` caps reasoning and answer together);
``tool_choice`` auto / any / tool / none -> auto / required / the named function / none;
``stop_sequences`` -> ``stop``; ``temperature``, ``top_p``, ``top_k`` as in chat; a final
assistant turn is a prefill (chat's ``prefix: true``: the answer continues it). A
``tool_result``'s ``is_error`` is accepted and not rendered (V4's tool turn has no error flag).

The answer is built from the parser's events: reasoning -> a ``thinking`` block (signed with
the message id, as deepseek-recipe signs it), content -> ``text``, each call -> ``tool_use``
(id ``toolu_<24 hex>``, ``input`` the parsed arguments). ``stop_reason``: ``tool_use`` when a
call was made and the output was not cut, ``max_tokens`` when it was, ``stop_sequence`` (with
``stop_sequence``) when a stop string ended it, else ``end_turn``. Streaming sends Anthropic's
event sequence; the non-streaming answer is the same events folded into one message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import deepseek_recipe as dr

from dsv4.errors import InvalidRequestError
from dsv4.output_processor import Delta
from dsv4.server.anthropic_protocol import (
    CountTokensRequest,
    MessagesRequest,
    anthropic_error,
    event,
    reject_unsupported_messages,
)
from dsv4.server.api_serve import renamed_fields
from dsv4.server.chat import ChatRun, prepare_chat, render_chat_prompt
from dsv4.server.errors import APIError
from dsv4.server.output_items import CALL, DELTA, OPEN, REASONING_ITEM, OutputItems, Step
from dsv4.server.protocol import ChatCompletionRequest
from dsv4.server.recipe import convert, to_chat
from dsv4.server.state import ServerState

__all__ = ["MessagesRun", "chat_body", "count_tokens", "prepare_messages"]

_FIELDS = {"stop": "stop_sequences"}  # chat field -> this API's

_LIBRARY_FIELDS = ("messages", "system", "tools", "thinking")


def chat_body(state: ServerState, req: CountTokensRequest | MessagesRequest,
              raw: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body of the same conversation and settings."""
    reject_unsupported_messages(req)
    model = state.check_model(req.model)
    converted = convert(state, dr.MessagesRequest,
                        {k: raw[k] for k in _LIBRARY_FIELDS if raw.get(k) is not None}, model)
    conversation = converted.conversation
    messages, tools = to_chat(conversation)
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and not last.get("tool_calls"):
        last["prefix"] = True  # a final assistant turn is a prefill: the model continues it
    body: dict[str, Any] = {
        "model": model, "messages": messages, "tools": tools or None,
        "tool_choice": _tool_choice(req.tool_choice),
        "thinking": {"type": "enabled" if conversation.thinking_mode else "disabled"},
    }
    effort = (req.output_config or {}).get("effort")
    if effort is not None:
        body["reasoning_effort"] = effort
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stop=req.stop_sequences, stream=req.stream,
                    temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    return {k: v for k, v in body.items() if v is not None}


def _tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise APIError(400, "tool_choice.name: a 'tool' choice names the tool",
                           param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', not {kind!r}",
                   param="tool_choice.type")


def count_tokens(state: ServerState, req: CountTokensRequest, raw: dict[str, Any]) -> int:
    """The number of prompt tokens the same Messages request would be rendered to."""
    prompt = render_chat_prompt(state, chat_body(state, req, raw))
    return len(state.processor.tokenize(prompt, "messages"))


def prepare_messages(state: ServerState, req: MessagesRequest, raw: dict[str, Any]
                     ) -> MessagesRun:
    """Validate, convert, render and tokenize; 4xx before any work starts (worker thread)."""
    body = chat_body(state, req, raw)
    try:
        chat = prepare_chat(state, ChatCompletionRequest.model_validate(body), body)
    except (APIError, InvalidRequestError) as exc:
        raise renamed_fields(exc, _FIELDS) from exc
    return MessagesRun(chat, body["model"], req.stream)


class MessagesRun:
    """One Messages request: output items -> Anthropic content blocks and stream events."""

    def __init__(self, chat: ChatRun, model: str, stream: bool) -> None:
        self.chat, self.gen, self.model, self.streaming = chat, chat.gen, model, stream
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.items = OutputItems()
        self.blocks: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def _events(self, delta: Delta) -> list[dict[str, Any]]:
        steps = self.items.feed(self.chat.events(delta))
        if delta.finished:
            steps += self.items.close()
            reason = self.chat.choices[0].finish_reason
            if reason == "length":
                self.stop_reason = "max_tokens"
            elif reason == "tool_calls":
                self.stop_reason = "tool_use"
            elif isinstance(delta.stop_reason, str):
                self.stop_reason, self.stop_sequence = "stop_sequence", delta.stop_reason
            else:
                self.stop_reason = "end_turn"
        return [e for step in steps for e in self._step(step)]

    def _step(self, step: Step) -> list[dict[str, Any]]:
        item = self.items.items[step.index]
        if step.op == OPEN:
            if item.kind == CALL:
                block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                         "name": item.name, "input": {}}
            else:
                block = {"type": "thinking", "thinking": "", "signature": ""} \
                    if item.kind == REASONING_ITEM else {"type": "text", "text": ""}
            self.blocks.append(dict(block))
            return [{"type": "content_block_start", "index": step.index, "content_block": block}]
        block = self.blocks[step.index]
        if step.op == DELTA:
            if item.kind == CALL:
                delta = {"type": "input_json_delta", "partial_json": step.text}
            else:
                field = "thinking" if item.kind == REASONING_ITEM else "text"
                block[field] += step.text
                delta = {"type": f"{field}_delta", field: step.text}
            return [{"type": "content_block_delta", "index": step.index, "delta": delta}]
        out = []
        if item.kind == REASONING_ITEM:
            block["signature"] = self.id
            out.append({"type": "content_block_delta", "index": step.index,
                        "delta": {"type": "signature_delta", "signature": self.id}})
        elif item.kind == CALL:
            block["input"] = _input(item.text)
        out.append({"type": "content_block_stop", "index": step.index})
        return out

    def usage(self) -> dict[str, int]:
        u = self.chat.usage()
        cached = u.prompt_tokens_details.cached_tokens
        # Anthropic counts the prompt in parts: input_tokens are those not read from the cache
        return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}

    def message(self, content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": self.blocks if content is None else content,
                "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
                "usage": self.usage()}

    # ---- non-streaming ---------------------------------------------------------------------------
    async def collect(self, stream: AsyncIterator[Delta]) -> dict[str, Any]:
        async for delta in stream:
            self._events(delta)
        return self.message()

    # ---- streaming ------------------------------------------------------------------------------
    def sse_start(self) -> list[str]:
        start = self.message([])
        start["usage"]["output_tokens"] = 0
        return [event({"type": "message_start", "message": start}), event({"type": "ping"})]

    def sse(self, delta: Delta) -> list[str]:
        out = [event(e) for e in self._events(delta)]
        if delta.finished:
            out.append(event({"type": "message_delta",
                              "delta": {"stop_reason": self.stop_reason,
                                        "stop_sequence": self.stop_sequence},
                              "usage": {"output_tokens": self.usage()["output_tokens"]}}))
            out.append(event({"type": "message_stop"}))
        return out

    def sse_end(self) -> list[str]:
        return []

    @staticmethod
    def error_body(status: int, message: str) -> dict[str, Any]:
        return anthropic_error(status, message)

    def sse_error(self, status: int, message: str) -> list[str]:
        return [event(anthropic_error(status, message))]


def _input(arguments: str) -> dict[str, Any]:
    """A call's ``input``: its arguments as an object (kept whole under "arguments" in the rare
    case they are not a JSON object)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}
