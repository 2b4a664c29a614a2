"""DeepSeek-V4 chat prompt encoder and strict completion parser.

``encode_messages`` renders exactly the prompt string of DeepSeek's reference
``encoding/encoding_dsv4.py`` (rules: ``shared/docs/chat_format.md`` section 1), and
``parse_message_from_completion_text`` accepts exactly the completions the reference accepts,
raising ``ValueError`` where the reference raises or asserts. Server conveniences on top of the
reference (request-level ``tools``, ``prefix`` completion, content-part lists, the 0731 effort
table) leave the output unchanged for every input the reference itself renders.
Input messages are never mutated.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from dsv4.encoding_effort import PROFILE_0731, PROFILE_PREVIEW, effort_prefix
from dsv4.encoding_parse import arguments_json, parse_message_from_completion_text
from dsv4.encoding_tokens import (
    ASSISTANT,
    BLOCK_CLOSE,
    BLOCK_OPEN,
    BOS,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    LATEST_REMINDER,
    PARAM_END,
    PARAM_OPEN,
    TASK_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALLS_START,
    USER,
    to_json,
)

__all__ = [
    "ASSISTANT", "BLOCK_CLOSE", "BLOCK_OPEN", "BOS", "DSML", "EOS", "INVOKE_CLOSE", "INVOKE_OPEN",
    "LATEST_REMINDER", "PARAM_END", "PARAM_OPEN", "PROFILE_0731", "PROFILE_PREVIEW",
    "TASK_TOKENS", "THINK_CLOSE", "THINK_OPEN", "TOOL_CALLS_START", "USER", "arguments_json",
    "encode_messages", "find_last_user_index", "flatten_content", "merge_tool_messages",
    "parse_message_from_completion_text", "render_tool_calls", "render_tools",
    "sort_tool_results_by_call_order", "to_json",
]

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_RESPONSE_FORMAT_HEAD = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)


def render_tools(functions: Sequence[dict[str, Any]]) -> str:
    """The "## Tools" section for a list of function schemas (no leading separator)."""
    schemas = "\n".join(to_json(fn) for fn in functions)
    d = DSML
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. You can invoke "
        f'tools by writing a "<{d}tool_calls>" block like the following:\n\n'
        f"<{d}tool_calls>\n"
        f'<{d}invoke name="$TOOL_NAME">\n'
        f'<{d}parameter name="$PARAMETER_NAME" string="true|false">'
        f"$PARAMETER_VALUE</{d}parameter>\n"
        "...\n"
        f"</{d}invoke>\n"
        f'<{d}invoke name="$TOOL_NAME2">\n'
        "...\n"
        f"</{d}invoke>\n"
        f"</{d}tool_calls>\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other '
        "types (numbers, booleans, arrays, objects), pass the value in JSON format and set "
        '`string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete "
        f"reasoning inside {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response."
        "\n\n"
        f"Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
        f"{schemas}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke "
        "tool calls.\n"
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def flatten_content(content: Any) -> Any:
    """Join an OpenAI content-part list into one string (text parts joined by "\\n").

    Strings and ``None`` pass through. Non-text parts raise ``ValueError`` (text-only model).
    """
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") in _TEXT_PART_TYPES:
            texts.append(str(part.get("text") or ""))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"unsupported content part of type {kind!r}")
    return "\n".join(texts)


def _prepare(messages: Sequence[dict[str, Any]], is_request: bool) -> list[dict[str, Any]]:
    """Deep-copy, flatten content lists (tool results keep theirs), map ``prefix`` to ``wo_eos``."""
    out = [copy.deepcopy(dict(m)) for m in messages]
    for msg in out:
        if msg.get("role") != "tool" and isinstance(msg.get("content"), list):
            msg["content"] = flatten_content(msg["content"])
    if is_request and out and out[-1].get("role") == "assistant" and out[-1].get("prefix"):
        out[-1]["wo_eos"] = True
    return out


def _attach_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> None:
    """Request-level tools go on a leading system message, else on a new empty one."""
    if messages and messages[0].get("role") == "system":
        messages[0]["tools"] = tools
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": tools})


def merge_tool_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn tool messages into ``tool_result`` blocks of user turns; merge adjacent user text."""
    merged: list[dict[str, Any]] = []
    for original in messages:
        msg = copy.deepcopy(original)
        role = msg.get("role")
        prev = merged[-1] if merged else None
        prev_is_blocks = bool(prev) and prev.get("role") == "user" and "content_blocks" in prev
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if prev_is_blocks:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if prev_is_blocks and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def sort_tool_results_by_call_order(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reorder tool results inside each user turn by the latest assistant's call order."""
    order: dict[Any, int] = {}
    for msg in messages:
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            order = {}
            for pos, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or (call.get("function") or {}).get("id", "")
                if call_id:
                    order[call_id] = pos
        elif role == "user" and msg.get("content_blocks"):
            blocks = msg["content_blocks"]
            results = [b for b in blocks if b.get("type") == "tool_result"]
            if len(results) < 2 or not order:
                continue
            queue = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
            msg["content_blocks"] = [
                next(queue) if b.get("type") == "tool_result" else b for b in blocks
            ]
    return messages


def find_last_user_index(messages: Sequence[dict[str, Any]]) -> int:
    """Index of the last user or developer message, -1 if none."""
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx].get("role") in ("user", "developer"):
            return idx
    return -1


def _drop_thinking_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user turn: strip assistant reasoning and remove developer messages."""
    last_user = find_last_user_index(messages)
    kept: list[dict[str, Any]] = []
    for idx, msg in enumerate(messages):
        role = msg.get("role")
        if idx >= last_user or role in ("user", "system", "tool", "latest_reminder",
                                        "direct_search_results"):
            kept.append(msg)
        elif role == "assistant":
            stripped = dict(msg)
            stripped.pop("reasoning_content", None)
            kept.append(stripped)
    return kept


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _call_arguments(raw: Any) -> dict[str, Any]:
    """Parsed tool-call arguments; non-JSON (or non-object) text becomes ``{"arguments": raw}``."""
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw)
    except Exception:  # noqa: BLE001 - any failure falls back, as in the reference
        return {"arguments": raw}
    return parsed if isinstance(parsed, dict) else {"arguments": raw}


def render_tool_calls(tool_calls: Sequence[dict[str, Any]]) -> str:
    """The DSML block of an assistant turn, including the leading "\\n\\n"."""
    invokes = []
    for call in tool_calls:
        fn = call.get("function") or {}
        params = []
        for key, value in _call_arguments(fn.get("arguments")).items():
            is_str = isinstance(value, str)
            text = value if is_str else to_json(value)
            flag = "true" if is_str else "false"
            params.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
        body = "\n".join(params)
        invokes.append(f'<{DSML}invoke name="{fn.get("name")}">\n{body}\n</{DSML}invoke>')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _tool_result_text(content: Any) -> str:
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif part.get("type") == "text":
                parts.append(part.get("text", ""))
            else:
                parts.append(f"[Unsupported {part.get('type')}]")
        content = "\n\n".join(parts)
    return f"<tool_result>{content}</tool_result>"


def _user_body(msg: dict[str, Any]) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return msg.get("content") or ""
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text") or "")
        elif kind == "tool_result":
            parts.append(_tool_result_text(block.get("content", "")))
        else:
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)


def _instructions_suffix(msg: dict[str, Any]) -> str:
    """Tools and response-format sections carried by a system or developer message."""
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools([t.get("function", t) for t in msg["tools"]])
    if msg.get("response_format"):
        out += "\n\n" + _RESPONSE_FORMAT_HEAD + to_json(msg["response_format"])
    return out


def _render_message(
    index: int,
    messages: list[dict[str, Any]],
    thinking: bool,
    drop_thinking: bool,
    prefix: str,
    last_user: int,
) -> str:
    """One message of ``messages``; ``last_user`` is ``find_last_user_index(messages)``, found
    once by the caller (per message it made rendering quadratic in the conversation length)."""
    msg = messages[index]
    role = msg.get("role")
    out = prefix if index == 0 and thinking else ""

    if role == "system":
        out += (msg.get("content") or "") + _instructions_suffix(msg)
    elif role == "developer":
        if not msg.get("content"):
            raise ValueError("a developer message needs non-empty content")
        out += USER + msg["content"] + _instructions_suffix(msg)
    elif role == "user":
        out += USER + _user_body(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + (msg.get("content") or "")
    elif role == "assistant":
        reasoning = ""
        prev_has_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking and not prev_has_task and (not drop_thinking or index > last_user):
            reasoning = (msg.get("reasoning_content") or "") + THINK_CLOSE
        calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
        out += reasoning + (msg.get("content") or "") + calls
        if not msg.get("wo_eos", False):
            out += EOS
    else:
        raise ValueError(f"unknown message role {role!r}")

    # Transition: what opens the next assistant turn, if one follows.
    if index + 1 < len(messages) and messages[index + 1].get("role") not in (
        "assistant", "latest_reminder"
    ):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"invalid task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        if task == "action":
            out += ASSISTANT + (THINK_OPEN if thinking else THINK_CLOSE)
        out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        open_think = thinking and (not drop_thinking or index >= last_user)
        out += ASSISTANT + (THINK_OPEN if open_think else THINK_CLOSE)
    return out


def encode_messages(
    messages: Sequence[dict[str, Any]],
    thinking_mode: str,
    context: Sequence[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
    *,
    tools: list[dict[str, Any]] | None = None,
    effort_profile: str = PROFILE_PREVIEW,
) -> str:
    """Render a conversation into the DeepSeek-V4 prompt string.

    ``thinking_mode`` is "thinking" or "chat". ``context`` is an already-rendered prefix of the
    conversation (it is not emitted, and BOS is omitted). ``reasoning_effort`` is validated
    against ``effort_profile`` ("preview" or "0731"). ``tools`` (OpenAI format) is attached to a
    leading system message, or to a new empty one, exactly as a request's top-level tools.
    A final assistant message with ``prefix: true`` is rendered open (no EOS) for completion.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', not {thinking_mode!r}")
    prefix = effort_prefix(reasoning_effort, effort_profile)
    ctx = _prepare(context or [], is_request=False)
    msgs = _prepare(messages, is_request=True)
    if tools:
        _attach_tools(ctx if ctx else msgs, list(tools))
    ctx = merge_tool_messages(ctx)
    msgs = merge_tool_messages(msgs)
    full = sort_tool_results_by_call_order(ctx + msgs)

    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m.get("tools") for m in full)
    start = len(ctx)
    if thinking and drop:
        full = _drop_thinking_messages(full)
        start = len(_drop_thinking_messages(ctx))

    out = BOS if add_default_bos_token and not ctx else ""
    last_user = find_last_user_index(full)
    for idx in range(start, len(full)):
        out += _render_message(idx, full, thinking, drop, prefix, last_user)
    return out
