"""POST /v1/responses (OpenAI Responses API) over chat completions.

``input`` (a string or items: messages, ``reasoning``, ``function_call``,
``function_call_output``) and ``instructions`` are converted by ``deepseek-recipe``
(``dsv4.server.recipe``) and served as the chat-completions request of the same conversation:
same encoder, same tool-call grammar, same output parser. ``reasoning.effort`` is read
exactly as chat completions reads it (``none`` turns thinking off; levels map to the
checkpoint's effort profile); ``tool_choice`` auto / none / required / {"type": "function",
"name"} -> the chat spelling; ``max_output_tokens`` -> ``max_tokens``.

Output items: ``reasoning`` (its text as a ``reasoning_text`` part), ``message`` (one
``output_text`` part), ``function_call`` (``call_id`` ``call_<24 hex>``). A response cut by the
token limit has status ``incomplete`` (reason ``max_output_tokens``). Streaming sends the
Responses event sequence (``response.created`` ... ``response.completed``), each event with
its ``sequence_number``. Unless ``store`` is false, the conversation is kept in a bounded
in-memory store (``ResponseStore``) for ``previous_response_id``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import deepseek_recipe as dr

from dsv4.errors import InvalidRequestError
from dsv4.output_processor import Delta
from dsv4.server.api_serve import renamed_fields
from dsv4.server.chat import ChatRun, prepare_chat
from dsv4.server.errors import APIError
from dsv4.server.output_items import CALL, DELTA, OPEN, REASONING_ITEM, OutputItems, Step
from dsv4.server.protocol import ChatCompletionRequest
from dsv4.server.recipe import convert, to_chat
from dsv4.server.responses_protocol import (
    ResponsesRequest,
    ResponseStore,
    reject_unsupported_responses,
)
from dsv4.server.state import ServerState

__all__ = ["ResponsesRun", "chat_body", "prepare_responses"]

_FIELDS = {"max_tokens": "max_output_tokens"}  # chat field -> this API's


def _hex() -> str:
    return uuid.uuid4().hex[:24]


def input_items(req: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """The whole conversation as input items: the stored chain, then this request's input."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) \
        else list(req.input)
    if req.previous_response_id is not None:
        items = store.get(req.previous_response_id) + items
    return items


def chat_body(state: ServerState, req: ResponsesRequest, items: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """The chat-completions body of the same conversation and settings."""
    reject_unsupported_responses(req)
    model = state.check_model(req.model)
    library: dict[str, Any] = {"input": items}
    for name in ("instructions", "tools", "reasoning"):
        if getattr(req, name) is not None:
            library[name] = getattr(req, name)
    messages, tools = to_chat(convert(state, dr.ResponsesRequest, library, model).conversation)
    body: dict[str, Any] = {
        "model": model, "messages": messages, "tools": tools or None,
        "tool_choice": _tool_choice(req.tool_choice), "reasoning": req.reasoning,
        "max_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "stream": req.stream,
    }
    return {k: v for k, v in body.items() if v is not None}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or "
                   "{\"type\": \"function\", \"name\": ...}", param="tool_choice")


def prepare_responses(state: ServerState, req: ResponsesRequest, store: ResponseStore
                      ) -> ResponsesRun:
    """Validate, convert, render and tokenize; 4xx before any work starts (worker thread)."""
    items = input_items(req, store)
    body = chat_body(state, req, items)
    try:
        chat = prepare_chat(state, ChatCompletionRequest.model_validate(body), body)
    except (APIError, InvalidRequestError) as exc:
        raise renamed_fields(exc, _FIELDS) from exc
    return ResponsesRun(chat, body["model"], req, items, store)


class ResponsesRun:
    """One Responses request: output items -> Responses output and stream events."""

    def __init__(self, chat: ChatRun, model: str, req: ResponsesRequest,
                 items: list[dict[str, Any]], store: ResponseStore) -> None:
        self.chat, self.gen, self.model, self.req = chat, chat.gen, model, req
        self.streaming = req.stream
        self.inputs, self.store = items, store
        self.id = f"resp_{_hex()}"
        self.created_at = int(time.time())
        self.items = OutputItems()
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.seq = 0

    def _events(self, delta: Delta) -> list[dict[str, Any]]:
        steps = self.items.feed(self.chat.events(delta))
        if delta.finished:
            steps += self.items.close()
        out = [e for step in steps for e in self._step(step)]
        if delta.finished:
            cut = self.chat.choices[0].finish_reason == "length"
            self.status = "incomplete" if cut else "completed"
            if cut and self.output:
                self.output[-1]["status"] = "incomplete"
            if self.req.store is not False:
                self.store.put(self.id, self.inputs + [_as_input(o) for o in self.output])
        return out

    def _step(self, step: Step) -> list[dict[str, Any]]:
        item = self.items.items[step.index]
        where = {"output_index": step.index}
        if step.op == OPEN:
            if item.kind == CALL:
                out_item = {"id": f"fc_{_hex()}", "type": "function_call",
                            "call_id": f"call_{_hex()}", "name": item.name, "arguments": "",
                            "status": "in_progress"}
            elif item.kind == REASONING_ITEM:
                out_item = {"id": f"rs_{_hex()}", "type": "reasoning", "summary": [],
                            "content": [], "status": "in_progress"}
            else:
                out_item = {"id": f"msg_{_hex()}", "type": "message", "role": "assistant",
                            "content": [], "status": "in_progress"}
            self.output.append(out_item)
            out = [{"type": "response.output_item.added", **where, "item": dict(out_item)}]
            if item.kind != CALL:
                out.append({"type": "response.content_part.added", **where,
                            "item_id": out_item["id"], "content_index": 0,
                            "part": _part(item.kind, "")})
            return out
        out_item = self.output[step.index]
        where["item_id"] = out_item["id"]
        if step.op == DELTA:
            if item.kind == CALL:
                return [{"type": "response.function_call_arguments.delta", **where,
                         "delta": step.text}]
            kind = "reasoning_text" if item.kind == REASONING_ITEM else "output_text"
            extra = {} if item.kind == REASONING_ITEM else {"logprobs": []}
            return [{"type": f"response.{kind}.delta", **where, "content_index": 0,
                     "delta": step.text, **extra}]
        out_item["status"] = "completed"
        if item.kind == CALL:
            out_item["arguments"] = item.text or "{}"
            out = [{"type": "response.function_call_arguments.done", **where,
                    "name": item.name, "arguments": out_item["arguments"]}]
        else:
            part = _part(item.kind, item.text)
            out_item["content"] = [part]
            kind = "reasoning_text" if item.kind == REASONING_ITEM else "output_text"
            out = [{"type": f"response.{kind}.done", **where, "content_index": 0,
                    "text": item.text},
                   {"type": "response.content_part.done", **where, "content_index": 0,
                    "part": part}]
        del where["item_id"]
        out.append({"type": "response.output_item.done", **where, "item": dict(out_item)})
        return out

    def response(self) -> dict[str, Any]:
        req, u = self.req, self.chat.usage()
        reasoning = u.completion_tokens_details.reasoning_tokens \
            if u.completion_tokens_details else 0
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if self.status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.model, "output": self.output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [], "truncation": req.truncation or "disabled",
            "metadata": req.metadata or {}, "user": req.user,
            "usage": {"input_tokens": u.prompt_tokens,
                      "input_tokens_details": {
                          "cached_tokens": u.prompt_tokens_details.cached_tokens},
                      "output_tokens": u.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": reasoning},
                      "total_tokens": u.total_tokens},
        }

    # ---- non-streaming ---------------------------------------------------------------------------
    async def collect(self, stream: AsyncIterator[Delta]) -> dict[str, Any]:
        async for delta in stream:
            self._events(delta)
        return self.response()

    # ---- streaming ------------------------------------------------------------------------------
    def _sse(self, payload: dict[str, Any]) -> str:
        payload["sequence_number"] = self.seq
        self.seq += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def sse_start(self) -> list[str]:
        return [self._sse({"type": "response.created", "response": self.response()}),
                self._sse({"type": "response.in_progress", "response": self.response()})]

    def sse(self, delta: Delta) -> list[str]:
        return [self._sse(e) for e in self._events(delta)]

    def sse_end(self) -> list[str]:
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return [self._sse({"type": kind, "response": self.response()})]

    def sse_error(self, status: int, message: str) -> list[str]:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return [self._sse({"type": "error", "code": kind, "message": message, "param": None})]


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == REASONING_ITEM:
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item that replays it."""
    if item["type"] == "function_call":
        return {"type": "function_call", "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"]}
    return {k: v for k, v in item.items() if k != "status"}
