"""Strict parser of one DeepSeek-V4 completion, with the reference parser's exact semantics.

``parse_message_from_completion_text`` accepts exactly the completions that DeepSeek's
``encoding_dsv4.py`` accepts and returns the same dict; it raises ``ValueError`` wherever the
reference raises or asserts (missing ``</think>`` or EOS, strict DSML whitespace, duplicate
parameters, special tokens in content). ``require_eos=False`` also accepts a completion whose
final EOS is absent, which is the text ``LLM.chat`` returns (EOS ends generation and, being a
special token, is never part of the output text). The streaming server parser is a tolerant
superset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dsv4.encoding_tokens import (
    BLOCK_CLOSE,
    BOS,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_END,
    PARAM_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALLS_START,
    to_json,
)

_HEADER_RE = re.compile(r'^\s*name="(.*?)">\n$', re.S)
_PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.S)


def _scan(text: str, pos: int, stops: Sequence[str]) -> tuple[str, int, str | None]:
    """Text from ``pos`` to the earliest stop string, the position after it, and the stop."""
    best, hit = len(text), None
    for stop in stops:
        found = text.find(stop, pos)
        if found != -1 and found < best:
            best, hit = found, stop
    if hit is None:
        return text[pos:], len(text), None
    return text[pos:best], best + len(hit), hit


def arguments_json(params: Sequence[tuple[str, str, bool]]) -> str:
    """Arguments string built from (key, raw value, is_string) like the reference parser."""
    items = [f"{to_json(k)}: {to_json(v) if is_str else v}" for k, v, is_str in params]
    return "{" + ", ".join(items) + "}"


def _parse_block(text: str, pos: int) -> tuple[int, list[dict[str, str]]]:
    calls: list[dict[str, str]] = []
    while pos < len(text):
        filler, pos, hit = _scan(text, pos, (INVOKE_OPEN, BLOCK_CLOSE))
        if filler != ">\n":
            raise ValueError(f"tool call format error: expected '>\\n', got {filler!r}")
        if hit == BLOCK_CLOSE:
            break
        if hit is None:
            raise ValueError("tool call block is missing its closing tag")
        header, pos, hit = _scan(text, pos, (PARAM_OPEN, INVOKE_CLOSE))
        match = _HEADER_RE.match(header)
        if match is None:
            raise ValueError(f"tool name format error: {header!r}")
        params: list[tuple[str, str, bool]] = []
        while hit == PARAM_OPEN:
            body, pos, hit = _scan(text, pos, (PARAM_END,))
            pmatch = _PARAM_RE.match(body)
            if pmatch is None:
                raise ValueError(f"parameter format error: {body!r}")
            key, flag, value = pmatch.groups()
            if any(key == k for k, _, _ in params):
                raise ValueError(f"duplicate parameter name {key!r}")
            params.append((key, value, flag == "true"))
            filler, pos, hit = _scan(text, pos, (PARAM_OPEN, INVOKE_CLOSE))
            if filler != ">\n":
                raise ValueError(f"parameter format error: expected '>\\n', got {filler!r}")
        calls.append({"name": match.group(1), "arguments": arguments_json(params)})
    return pos, calls


def parse_message_from_completion_text(text: str, thinking_mode: str, *,
                                       require_eos: bool = True) -> dict[str, Any]:
    """Split one raw completion into the reference's assistant-message dict.

    Returns ``{"role", "content", "reasoning_content", "tool_calls"}`` with OpenAI-format tool
    calls (no ids). Raises ``ValueError`` on anything the reference parser rejects. With the
    default ``require_eos=True`` the completion must end with EOS (after plain content), as the
    reference demands; ``require_eos=False`` lets it end without one, for text from ``LLM.chat``
    or the server, where EOS is stripped. An EOS that is present must still be the last thing.
    """
    reasoning, pos = "", 0
    if thinking_mode == "thinking":
        reasoning, pos, hit = _scan(text, 0, (THINK_CLOSE, TOOL_CALLS_START))
        if hit != THINK_CLOSE:
            raise ValueError("invalid thinking format: missing </think>")
    content, pos, hit = _scan(text, pos, (EOS, TOOL_CALLS_START))
    calls: list[dict[str, str]] = []
    if hit == TOOL_CALLS_START:
        pos, calls = _parse_block(text, pos)
        trailing, pos, hit = _scan(text, pos, (EOS,))
        if trailing:
            raise ValueError(f"unexpected content after tool calls: {trailing!r}")
    elif hit != EOS and require_eos:
        raise ValueError("invalid format: missing EOS token (LLM.chat output text never holds "
                         "EOS; parse it with require_eos=False)")
    if pos != len(text):
        raise ValueError(f"unexpected content at end: {text[pos:]!r}")
    for token in (BOS, EOS, THINK_OPEN, THINK_CLOSE, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"unexpected special token {token!r} in content")
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [{"type": "function", "function": call} for call in calls],
    }
