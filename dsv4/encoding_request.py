"""Map an OpenAI-style chat request onto ``dsv4.encoding.encode_messages`` arguments.

Thinking follows the DeepSeek API: on unless disabled. Precedence: top-level
``thinking: {"type": "enabled"|"disabled"}``, then ``chat_template_kwargs`` (``thinking``,
``enable_thinking``, ``thinking_mode``), then ``reasoning_effort`` (``"none"`` turns it off, any
level on), then the default: on, unless the caller (``dsv4 serve --default-thinking off``) says
otherwise.
Effort spellings (``reasoning_effort``, ``reasoning.effort``, ``chat_template_kwargs``) map to the
checkpoint's effort profile; an unknown spelling raises ``InvalidRequestError`` naming the
request field (a 400 for the server).
The raw ``tools`` JSON is passed through untouched (never re-serialized through a model class).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dsv4.encoding_effort import PROFILE_0731, PROFILE_PREVIEW, check_profile
from dsv4.errors import InvalidRequestError

# client spelling -> encoder level, per profile (chat_format.md section 1.10 / 4.1)
_EFFORT_MAP: dict[str, dict[str, str]] = {
    PROFILE_0731: {
        "minimal": "low", "low": "low",
        "medium": "high", "high": "high", "xhigh": "high",
        "max": "max", "ultra": "max",
    },
    PROFILE_PREVIEW: {
        "minimal": "high", "low": "high", "medium": "high", "high": "high",
        "xhigh": "max", "max": "max", "ultra": "max",
    },
}
_DEFAULT_EFFORT = {PROFILE_0731: "high", PROFILE_PREVIEW: None}
_OFF_WORDS = ("none", "off", "disabled")
_TRUE_WORDS = ("enabled", "enable", "true", "on", "thinking")
_FALSE_WORDS = ("disabled", "disable", "false", "off", "chat", "none")


def _as_flag(value: Any, field: str) -> bool | None:
    """bool, "enabled"/"disabled"-style strings, or None (not given)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise InvalidRequestError(f"invalid value for {field}: {value!r}", param=field)


def _raw_effort(request: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str | None:
    value = request.get("reasoning_effort")
    reasoning = request.get("reasoning")
    if value is None and isinstance(reasoning, Mapping):
        value = reasoning.get("effort")
    if value is None:
        value = kwargs.get("reasoning_effort")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"reasoning_effort must be a string, not {value!r}",
                                  param="reasoning_effort")
    return value.strip().lower()


def resolve_thinking(request: Mapping[str, Any], default: bool = True) -> bool:
    """Whether the request asks for thinking mode; ``default`` when it does not say (True, as
    DeepSeek's API)."""
    kwargs = request.get("chat_template_kwargs") or {}
    thinking = request.get("thinking")
    if isinstance(thinking, Mapping):
        flag = _as_flag(thinking.get("type"), "thinking.type")
        if flag is not None:
            return flag
    elif thinking is not None:
        return bool(_as_flag(thinking, "thinking"))
    for key in ("thinking", "enable_thinking", "thinking_mode"):
        flag = _as_flag(kwargs.get(key), f"chat_template_kwargs.{key}")
        if flag is not None:
            return flag
    raw = _raw_effort(request, kwargs)
    return default if raw is None else raw not in _OFF_WORDS


def normalize_reasoning_effort(value: str | None, profile: str = PROFILE_PREVIEW) -> str | None:
    """Client effort spelling -> the encoder level of ``profile`` (None: profile default).

    0731: minimal/low -> low, medium/high/xhigh -> high, max/ultra -> max, default high.
    preview: max/xhigh/ultra -> max, every lower level -> high (which adds no prefix).
    """
    table = _EFFORT_MAP[check_profile(profile)]
    if value is None:
        return _DEFAULT_EFFORT[profile]
    word = value.strip().lower()
    if word not in table:
        raise InvalidRequestError(
            f"invalid reasoning_effort {value!r}; expected one of {sorted(table)} or 'none'",
            param="reasoning_effort")
    return table[word]


def _normalize_message(msg: Mapping[str, Any], developer_as_system: bool) -> dict[str, Any]:
    out = copy.deepcopy(dict(msg))
    role = out.get("role")
    if role == "developer" and developer_as_system:
        out["role"] = "system"
    if role == "tool" and out.get("content") is None:
        out["content"] = ""
    if role == "assistant" and out.get("reasoning_content") is None and "reasoning" in out:
        out["reasoning_content"] = out.pop("reasoning")
    return out


def encoder_args_from_request(
    request: Mapping[str, Any],
    *,
    effort_profile: str = PROFILE_PREVIEW,
    developer_as_system: bool = True,
    default_thinking: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``encode_messages`` built from an OpenAI chat request body.

    Returns ``messages``, ``thinking_mode``, ``reasoning_effort``, ``drop_thinking``, ``tools``
    and ``effort_profile``. ``developer_as_system`` gives ``developer`` the OpenAI meaning
    (system instructions); pass False to keep DeepSeek's own developer turn. A top-level
    ``task`` (quick instruction) is attached to the last user message. Tools are rendered even
    for ``tool_choice: "none"``; the output parser decides whether calls are reported.
    ``default_thinking`` is the mode of a request that names none.
    """
    check_profile(effort_profile)
    kwargs = request.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise InvalidRequestError("chat_template_kwargs must be an object",
                                  param="chat_template_kwargs")
    thinking = resolve_thinking(request, default_thinking)
    raw = _raw_effort(request, kwargs)
    effort = None
    if thinking:
        effort = normalize_reasoning_effort(None if raw in _OFF_WORDS else raw, effort_profile)
    elif raw is not None and raw not in _OFF_WORDS:
        normalize_reasoning_effort(raw, effort_profile)  # still reject unknown spellings

    messages = [_normalize_message(m, developer_as_system) for m in request.get("messages") or []]
    task = request.get("task")
    if task is not None:
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise InvalidRequestError("'task' needs a user message to attach to", param="task")
        users[-1]["task"] = task

    drop = kwargs.get("drop_thinking", True)
    return {
        "messages": messages,
        "thinking_mode": "thinking" if thinking else "chat",
        "reasoning_effort": effort,
        "drop_thinking": bool(drop),
        "tools": request.get("tools") or None,
        "effort_profile": effort_profile,
    }
