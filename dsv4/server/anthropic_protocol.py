"""Anthropic Messages API: request models, Anthropic's error shape and the SSE event format.

Requests forbid unknown fields (a 400 naming the field), as the rest of the server does;
``metadata`` and ``service_tier`` are accepted with no effect. Errors are
``{"type": "error", "error": {"type": ..., "message": ...}}`` with Anthropic's type for each
status. Stream events are ``event: <type>`` + ``data: <json>`` pairs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CountTokensRequest", "MessagesRequest", "anthropic_error", "event"]

# HTTP status -> Anthropic error type (https://docs.anthropic.com/en/api/errors)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                529: "overloaded_error"}


class _MessagesFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"effort": "low" | "medium" | "high" | "max"}


class MessagesRequest(_MessagesFields):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # accepted, no effect
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(_MessagesFields):
    pass


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def event(payload: dict[str, Any]) -> str:
    """One SSE event named by the payload's ``type``."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
