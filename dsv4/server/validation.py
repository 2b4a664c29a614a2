"""Request validation shared by the endpoints: size limits and the chat rules OpenAI enforces.

Every problem is an ``APIError`` (400; 413 for an oversized body) whose ``param`` names the field
the way OpenAI spells it (``messages[1].tool_calls[0].function.arguments``).

Limits keep one request from exhausting the host: the body is read up to ``body_limit`` bytes;
JSON may nest ``MAX_JSON_DEPTH`` levels; ``n`` and the number of choices a completions batch fans
out to (prompts x n) are at most ``MAX_CHOICES`` (OpenAI's limit on n); ``stop``,
``stop_token_ids``, ``logit_bias``, ``messages`` and ``tools`` have caps; ``seed`` and ``top_k``
must fit 64 bits. A lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not Unicode) anywhere
in a body is a 400 naming where it is, rather than being replaced by U+FFFD: the client learns
that its text was broken instead of getting an answer to different text.

Chat rules: every message but an assistant one with ``tool_calls`` needs ``content``; a content
list holds text parts (a tool result may also carry other parts, shown as unsupported); an
assistant ``tool_calls`` entry needs an ``id``, a ``function.name`` and ``function.arguments``
that are a JSON object (as a string, or as an object); a ``tool`` message needs a
``tool_call_id`` naming a call of the assistant message it follows (with only tool messages
between). Tools need a unique name of 1 to 64 characters from ``A-Z a-z 0-9 _ - . :`` (it is
written into the DSML call markup) and ``parameters``, when given, a JSON Schema object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from dsv4.server.errors import APIError

__all__ = [
    "MAX_CHOICES", "MAX_JSON_DEPTH", "MAX_LOGIT_BIAS", "MAX_MESSAGES", "MAX_PROMPTS", "MAX_STOP",
    "MAX_STOP_CHARS", "MAX_STOP_TOKEN_IDS", "MAX_TOOLS", "ROLES", "body_limit", "check_json",
    "check_messages", "check_prompt_batch", "check_sampling", "check_tools", "param_path",
    "read_body",
]

MAX_CHOICES = 128  # n; prompts x n on /v1/completions
MAX_PROMPTS = 128  # prompts in one /v1/completions request
MAX_STOP = 32  # stop strings
MAX_STOP_CHARS = 256  # characters in one stop string (each is matched against every new token)
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_MESSAGES = 16384
MAX_TOOLS = 128  # OpenAI's limit
MAX_JSON_DEPTH = 64
MIN_BODY_BYTES = 8 << 20
BODY_BYTES_PER_TOKEN = 64  # room for a full context of escaped text or token ids, and history
_INT64 = 1 << 63

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
_TEXT_PARTS = ("text", "input_text", "output_text")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def body_limit(max_model_len: int) -> int:
    """The largest request body accepted: enough for a full context, never under 8 MiB."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 once it is known to exceed ``limit`` (read no further)."""
    def too_big(size: str) -> APIError:
        return APIError(413, f"request body is {size} bytes; at most {limit} are accepted",
                        code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def param_path(loc: Sequence[str | int]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


def check_json(value: Any, base: tuple[str | int, ...] = ()) -> None:
    """Nesting depth and lone surrogates (in strings and keys) of a parsed JSON value."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, base)]
    while stack:
        item, loc = stack.pop()
        if isinstance(item, str):
            _check_text(item, loc)
            continue
        if len(loc) - len(base) > MAX_JSON_DEPTH:  # named by its field: the path is long
            field = param_path(loc[:len(base) + 1])
            raise _bad(field, f"{field} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, loc, is_key=True)
                if isinstance(child, (str, list, dict)):
                    stack.append((child, (*loc, key)))
        elif isinstance(item, list):
            stack.extend((child, (*loc, i)) for i, child in enumerate(item)
                         if isinstance(child, (str, list, dict)))


def _check_text(text: str, loc: tuple[str | int, ...], is_key: bool = False) -> None:
    if text.isascii():
        return
    found = _SURROGATE.search(text)
    if found is not None:  # a key is never echoed: it would not encode either
        where = param_path(loc) or "the request body"
        where = f"a key in {where}" if is_key else where
        raise _bad(param_path(loc), f"{where} holds a lone UTF-16 surrogate "
                   f"(U+{ord(found.group()):04X} at character {found.start()}), which is not "
                   "valid Unicode text")


# ---- sampling fields (chat and completions) -------------------------------------------------

def check_sampling(req: Any) -> None:
    """Caps on what one request fans out to or makes every step scan."""
    if not 1 <= req.n <= MAX_CHOICES:
        raise _bad("n", f"n must be in [1, {MAX_CHOICES}], got {req.n}")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP} are accepted")
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_CHARS:
            raise _bad("stop", f"stop[{i}] is {len(s)} characters long; at most "
                       f"{MAX_STOP_CHARS} are accepted")
    ids = req.stop_token_ids or []
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise _bad("stop_token_ids", f"stop_token_ids holds {len(ids)} ids; at most "
                   f"{MAX_STOP_TOKEN_IDS} are accepted")
    if len(req.logit_bias or {}) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"logit_bias holds {len(req.logit_bias)} tokens; at most "
                   f"{MAX_LOGIT_BIAS} are accepted")
    for name in ("seed", "top_k"):
        value = getattr(req, name)
        if value is not None and not -_INT64 <= value < _INT64:
            raise _bad(name, f"{name} must fit a signed 64-bit integer, got {value}")


def check_prompt_batch(prompt: Any, n: int, max_model_len: int) -> None:
    """/v1/completions: at most MAX_PROMPTS prompts and MAX_CHOICES choices; a token-id prompt
    is measured against the context before anything else looks at its ids."""
    if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    else:
        prompts = prompt if isinstance(prompt, list) else []
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are "
                   "accepted in one request")
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most "
                   f"{MAX_CHOICES} are accepted in one request")
    for p in prompts:
        if isinstance(p, list) and len(p) >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} "
                           f"tokens. However, your prompt has {len(p)} tokens.", param="prompt",
                           code="context_length_exceeded")


# ---- chat messages --------------------------------------------------------------------------

def check_messages(messages: Any) -> None:
    """OpenAI's rules for a chat ``messages`` list (see the module docstring)."""
    if not isinstance(messages, list):
        raise _bad("messages", "messages must be a list of message objects")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"messages holds {len(messages)} messages; at most "
                   f"{MAX_MESSAGES} are accepted")
    open_calls: set[str] | None = None  # ids a tool message may answer here
    for i, msg in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(at, f"{at} must be a message object")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"{at}.role", f"{at}.role must be one of {', '.join(ROLES)}, "
                       f"not {role!r}")
        if role == "tool":
            _check_tool_result(msg, at, open_calls)
        else:
            open_calls = _check_tool_calls(msg, at) if role == "assistant" else None
        content = msg.get("content")
        if content is None:
            if role != "assistant" or not msg.get("tool_calls"):
                need = " (an assistant message needs content or tool_calls)" \
                    if role == "assistant" else ""
                raise _bad(f"{at}.content", f"Missing required parameter: '{at}.content'{need}")
        else:
            _check_content(content, f"{at}.content", role)


def _check_content(content: Any, at: str, role: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(at, f"{at} must be a string or a list of content parts")
    for j, part in enumerate(content):
        if isinstance(part, str):
            continue
        if not isinstance(part, dict):
            raise _bad(f"{at}[{j}]", f"{at}[{j}] must be a content part object")
        kind = part.get("type", "text")
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise _bad(f"{at}[{j}].text", f"{at}[{j}].text must be a string")
        elif role != "tool":
            raise _bad(f"{at}[{j}].type", f"{at}[{j}]: content parts of type {kind!r} are not "
                       "supported (the model reads text only)")


def _check_tool_calls(msg: dict[str, Any], at: str) -> set[str] | None:
    """The ids of an assistant message's tool calls (None: it has none); 400 for a bad call."""
    calls = msg.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise _bad(f"{at}.tool_calls", f"{at}.tool_calls must be a list")
    ids: set[str] = set()
    for j, call in enumerate(calls):
        p = f"{at}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _bad(p, f"{p} must be a tool call object")
        if call.get("type", "function") != "function":
            raise _bad(f"{p}.type", f"{p}.type must be 'function'")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise _bad(f"{p}.id", f"Missing required parameter: '{p}.id'")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{p}.function", f"Missing required parameter: '{p}.function'")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{p}.function.name", f"Missing required parameter: '{p}.function.name'")
        _check_arguments(fn.get("arguments"), f"{p}.function.arguments")
        ids.add(call["id"])
    return ids or None


def _check_arguments(args: Any, at: str) -> None:
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except (ValueError, RecursionError) as exc:
            raise _bad(at, f"{at} must be a JSON object, but it is not valid JSON: "
                       f"{exc}") from exc
        if not isinstance(parsed, dict):
            raise _bad(at, f"{at} must be a JSON object, not {type(parsed).__name__}")
        check_json(parsed, (at,))  # escapes in the string may hide lone surrogates
    elif not isinstance(args, dict):
        raise _bad(at, f"Missing required parameter: '{at}' (a JSON object, as a string)"
                   if args is None else f"{at} must be a string holding a JSON object")


def _check_tool_result(msg: dict[str, Any], at: str, open_calls: set[str] | None) -> None:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{at}.tool_call_id", f"Missing required parameter: '{at}.tool_call_id'")
    if open_calls is None:
        raise _bad(f"{at}.role", f"{at}: a 'tool' message must answer a preceding assistant "
                   "message with 'tool_calls' (only tool messages may come between)")
    if call_id not in open_calls:
        raise _bad(f"{at}.tool_call_id", f"{at}.tool_call_id {call_id!r} is not the id of a "
                   "call in the preceding assistant message's tool_calls")


# ---- tools ----------------------------------------------------------------------------------

def check_tools(tools: Any) -> None:
    """An OpenAI ``tools`` list (None: no tools)."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are accepted")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn, dict):
            raise _bad(at, f"{at} must be {{\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _bad(f"{at}.function.name", f"{at}.function.name must be 1 to 64 characters "
                       f"from A-Z, a-z, 0-9, '_', '-', '.', ':', got {name!r}")
        if name in seen:
            raise _bad(f"{at}.function.name", f"{at}.function.name {name!r} is already the "
                       f"name of tools[{seen[name]}]; tool names must be unique")
        seen[name] = i
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"{at}.function.description", f"{at}.function.description must be a "
                       "string")
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict)
                                   or params.get("type", "object") != "object"):
            raise _bad(f"{at}.function.parameters", f"{at}.function.parameters must be a JSON "
                       "Schema object with type 'object'")
