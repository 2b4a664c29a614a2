"""DeepSeek's ``deepseek-recipe`` as the request converter of the Messages and Responses APIs.

The library turns an Anthropic Messages or OpenAI Responses body into a ``Conversation``
(system blocks, content blocks, ``tool_use`` / ``tool_result``, ``function_call`` /
``function_call_output`` items, thinking / reasoning history). ``to_chat`` writes that
conversation as an OpenAI chat ``messages`` list and ``tools`` list, so all three APIs are
rendered by the same encoder (``dsv4.encoding``) and parsed by the same output parser.

What the library decides and what dsv4 decides is explicit here (``conversion_options``):
the served model names are accepted (each mapped to the V4 version, which only selects the
library's checks: its prompt renderer is not used), a request that names no thinking mode gets
the server's ``--default-thinking``, web search (dsv4 has none) is dropped from Responses
requests (as DeepSeek's API does: agents such as Codex declare it by default) and refused in
Messages requests (a server tool there), and a ``max_tokens`` larger than the context is left
to the engine's check (a 400 naming it).
The library's API-level defaults are not used: effort, temperature and tool_choice come from
the request as chat completions reads them (the library forces temperature 1.0 in thinking
mode, adds the maximum-effort prefix by default and refuses a named tool in thinking mode).

Library differences worked around here, each with a test naming it
(tests/test_recipe_parity.py, tests/server/test_server_responses.py):
- Responses ``developer`` items become user turns in 0.2.0; dsv4 gives ``developer`` the
  OpenAI meaning everywhere (system instructions), so they are passed as ``system``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import deepseek_recipe as dr

from dsv4.server.errors import APIError
from dsv4.server.state import ServerState

__all__ = ["conversion_options", "convert", "to_chat"]

_ROLES = ("system", "user", "assistant", "tool", "latest_reminder")


def conversion_options(state: ServerState) -> dr.ConversionOptions:
    """dsv4's serving options as the library's ConversionOptions (see the module docstring)."""
    bound = state.max_model_len
    options = dr.ConversionOptions(
        default_thinking_mode=state.default_thinking,
        reasoning_content_behavior=dr.ReasoningContentBehavior.FillEmpty,
        responses_web_search=dr.WebSearchBehavior.Drop,
        messages_web_search=dr.WebSearchBehavior.Reject,
        thinking_max_tokens_upper_bound=bound,
        non_thinking_max_tokens_upper_bound=bound,
    )
    return options.with_model_versions_by_name(
        {name: dr.ModelVersion.DeepseekV4Pro for name in state.model_names})


def convert(state: ServerState, kind: Callable[[Any], Any], body: Mapping[str, Any],
            model: str) -> dr.ConversationRequest:
    """Convert ``body`` (its ``model`` replaced by the served name ``model``) with the library's
    ``kind`` (``dr.MessagesRequest`` or ``dr.ResponsesRequest``); a 400 with the library's
    message when it refuses the request."""
    data = dict(body, model=model)
    if kind is dr.ResponsesRequest:
        data["input"] = _developer_as_system(data.get("input"))
    try:
        return kind(data).convert(conversion_options(state))
    except dr.ConversionError as exc:
        raise APIError(exc.status_code if 400 <= exc.status_code < 500 else 400,
                       _library_message(exc)) from exc
    except ValueError as exc:  # the body does not deserialize (a wrong type or variant)
        raise APIError(400, str(exc)) from exc


def _library_message(exc: dr.ConversionError) -> str:
    try:
        return str(json.loads(exc.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc)


def _developer_as_system(items: Any) -> Any:
    """Responses input with ``developer`` message items given the ``system`` role."""
    if not isinstance(items, list):
        return items
    return [dict(item, role="system")
            if isinstance(item, dict) and item.get("role") == "developer"
            and item.get("type", "message") == "message" else item
            for item in items]


def to_chat(conversation: dr.Conversation) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chat ``messages``, chat ``tools``) for a converted conversation."""
    messages = [_chat_message(m) for m in conversation.messages]
    tools = [_chat_tool(t) for t in conversation.tools]
    return messages, tools


def _chat_message(msg: dr.Message) -> dict[str, Any]:
    role = msg.role
    if role not in _ROLES:
        raise APIError(400, f"messages: the {role!r} role is not supported")
    out: dict[str, Any] = {"role": role, "content": msg.content}
    if role == "assistant":
        if msg.reasoning_content is not None:
            out["reasoning_content"] = msg.reasoning_content
        if msg.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in msg.tool_calls]
        if msg.prefix:
            out["prefix"] = True
    elif role == "tool":
        out["tool_call_id"] = msg.tool_call_id
    return out


def _chat_tool(tool: dr.ToolDefinition) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    if tool.parameters is not None:
        fn["parameters"] = tool.parameters
    return {"type": "function", "function": fn}
