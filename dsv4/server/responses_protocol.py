"""OpenAI Responses API: the request model and the in-memory store behind
``previous_response_id``.

The request forbids unknown fields (a 400 naming the field). Accepted with no effect:
``metadata``, ``parallel_tool_calls``, ``truncation`` ("disabled" or "auto"), ``user``,
``include``, ``service_tier``, ``prompt_cache_key``, ``safety_identifier``. Refused with a 400:
``background: true``, a ``text.format`` other than text, ``top_logprobs`` above 0.

``ResponseStore`` keeps the conversation of the last ``capacity`` stored responses (their input
items, including the chain they continued, and their output as input items), so a request
with ``previous_response_id`` continues it; the oldest is forgotten first, and a forgotten or
unknown id is a 404.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dsv4.server.errors import APIError

__all__ = ["ResponseStore", "ResponsesRequest", "reject_unsupported_responses"]

STORE_CAPACITY = 512


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    # accepted, no effect
    metadata: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: str | None = None
    user: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


def reject_unsupported_responses(req: ResponsesRequest) -> None:
    if req.background:
        raise APIError(400, "background responses are not supported", param="background")
    fmt = (req.text or {}).get("format") or {}
    if fmt.get("type", "text") != "text":
        raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported yet "
                       "(only 'text')", param="text.format")
    if req.top_logprobs:
        raise APIError(400, "top_logprobs is not supported on /v1/responses",
                       param="top_logprobs")
    if req.truncation not in (None, "disabled", "auto"):
        raise APIError(400, "truncation must be 'disabled' or 'auto'", param="truncation")


class ResponseStore:
    """Response id -> the conversation as Responses input items (bounded, thread-safe)."""

    def __init__(self, capacity: int = STORE_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, items: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[response_id] = items
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]]:
        with self._lock:
            items = self._items.get(response_id)
        if items is None:
            raise APIError(404, f"Previous response with id '{response_id}' not found (only "
                           f"the last {self.capacity} stored responses are kept)",
                           param="previous_response_id")
        return list(items)
