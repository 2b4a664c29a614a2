"""Anthropic Messages API: request models, Anthropic's error shape and the SSE event format.

Requests forbid unknown fields (a 400 naming the field), as the rest of the server does;
``metadata``, ``service_tier``, ``cache_control``, ``speed``, ``inference_geo``,
``user_profile_id`` and ``workspace_id`` are accepted with no effect; a structured-output
format (``output_config.format``, ``output_format``) is refused until dsv4 constrains output.
Errors are ``{"type": "error", "error": {"type": ..., "message": ...}}`` with Anthropic's type
for each status. Stream events are ``event: <type>`` + ``data: <json>`` pairs.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dsv4.server.errors import APIError

__all__ = ["CountTokensRequest", "MessagesRequest", "anthropic_error", "event",
           "reject_unsupported_messages"]

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
    # accepted, no effect (prompt caching, routing and account fields of Anthropic's API)
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


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
    output_format: dict[str, Any] | None = None  # refused when set (structured output)


def reject_unsupported_messages(req: _MessagesFields) -> None:
    config = req.output_config or {}
    unknown = sorted(set(config) - {"effort"})
    if unknown or getattr(req, "output_format", None) is not None:
        field = f"output_config.{unknown[0]}" if unknown else "output_format"
        raise APIError(400, f"{field} is not supported (only output_config.effort)",
                       param=field)


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def event(payload: dict[str, Any]) -> str:
    """One SSE event named by the payload's ``type``."""
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
