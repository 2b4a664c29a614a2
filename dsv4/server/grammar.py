"""Tool calls by grammar: a Lark grammar (llguidance dialect) for the DSML block of declared tools.

Whenever the model may call tools (``tool_choice`` ``auto``, ``required`` or a named
function), the chat endpoint constrains the answer (after the reasoning, which the engine leaves
free) to the DSML tool-call block that V4 writes (chat_format.md section 1.7), ``strict`` or
not (a schema that does not compile is a 400 for a forced call or a ``strict`` function;
otherwise the calls go unconstrained)::

    \\n\\n<｜DSML｜tool_calls>\\n
    <｜DSML｜invoke name="NAME">\\n
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>\\n
    <｜DSML｜parameter name="KEY" string="false">JSON</｜DSML｜parameter>\\n
    </｜DSML｜invoke>\\n
    </｜DSML｜tool_calls>

Invoke names are the declared ones (only the named one for a named choice, which makes exactly
one call; ``required`` makes one or more). Parameters come in the schema's order, each one the
schema declares, the required ones always: a string parameter is raw text with
``string="true"`` (bounded by the schema's enum, pattern or maxLength where it has them), any
other is JSON that matches its schema with ``string="false"``. A tool without parameters gets
the empty body the encoder renders. With ``auto`` the answer is free text (never containing
``｜DSML｜``) or free text followed by a block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from dsv4.encoding_tokens import DSML
from dsv4.server.protocol import APIError
from dsv4.server.validation import check_tools
from dsv4.structured_outputs import JSON_OPTIONS

__all__ = ["any_strict", "resolve_tool_choice", "tool_call_grammar", "tool_schemas"]

_CLOSE = f"</{DSML}parameter>"


def tool_schemas(tools: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any] | None]:
    """Name -> parameters schema of an OpenAI ``tools`` list (400 naming the bad entry; rules in
    ``dsv4.server.validation.check_tools``)."""
    check_tools(tools)
    return {tool["function"]["name"]: tool["function"].get("parameters")
            for tool in tools or []}


def any_strict(tools: Sequence[dict[str, Any]] | None) -> bool:
    """Some function is declared ``strict: true`` (its schema must then compile)."""
    return any(isinstance(t.get("function"), dict) and t["function"].get("strict") is True
               for t in tools or [])


def resolve_tool_choice(tool_choice: str | dict[str, Any] | None,
                        names: list[str]) -> tuple[bool, str | None, bool]:
    """-> (tools_enabled, forced name or None, force a call). 400 for an invalid choice."""
    if tool_choice is None:
        return bool(names), None, False
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a named "
                           f"function, not {tool_choice!r}", param="tool_choice")
        if tool_choice == "none":
            return False, None, False
        if not names:
            raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        if tool_choice == "auto":
            return True, None, False
        return True, names[0] if len(names) == 1 else None, True
    fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "a named tool_choice is {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", param="tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                       param="tool_choice")
    return True, name, True


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _is_string(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "string":
        return True
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    return ("type" not in schema and isinstance(values, list) and bool(values)
            and all(isinstance(v, str) for v in values))


def _regex_body(pattern: str) -> str:
    """A JSON-schema pattern as the body of a Lark regex: whole-value match (anchors dropped),
    ``/`` escaped for the delimiters."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return re.sub(r"(?<!\\)/", r"\\/", pattern)


def _string_value(name: str, schema: dict[str, Any]) -> list[str]:
    """Rules for a raw string value followed by the closing tag and newline (rule ``name``)."""
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return [f"{name}: ({' | '.join(_lit(v) for v in values)}) {_lit(_CLOSE + chr(10))}"]
    end = r"<\/｜DSML｜parameter>\n"
    if isinstance(schema.get("pattern"), str):
        body = f"(?:{_regex_body(schema['pattern'])})"
    else:
        low = schema.get("minLength", 0)
        high = schema.get("maxLength")
        low = low if isinstance(low, int) and low >= 0 else 0
        high = f"{high}" if isinstance(high, int) and high >= low else ""
        body = f"(?s:.{{{low},{high}}})" if (low or high) else "(?s:.*)"
    token = name.upper()
    # one lexeme holds the value and its closing tag, and no earlier ｜DSML｜ closing tag
    return [f"{name}: {token}",
            f"{token}: /{body}{end}/ & ~/(?s:.*)<\\/｜DSML｜(?s:.*){end}/"]


def _json_value(name: str, schema: Any, root: dict[str, Any]) -> list[str]:
    sub: Any = schema if isinstance(schema, (dict, bool)) else {}
    if sub is True:
        sub = {}
    if isinstance(sub, dict):
        sub = {**sub, "x-guidance": JSON_OPTIONS}
        for key in ("$defs", "definitions"):  # $ref's into the tool's schema keep working
            if key in root and key not in sub:
                sub[key] = root[key]
    return [f"{name}: %json {json.dumps(sub, ensure_ascii=False)} {_lit(_CLOSE + chr(10))}"]


def _invoke(i: int, name: str, schema: dict[str, Any] | None) -> list[str]:
    schema = schema if isinstance(schema, dict) else {}
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = set(schema.get("required") or [])
    head = _lit(f'<{DSML}invoke name="{name}">\n')
    tail = _lit(f"</{DSML}invoke>")
    if not props:
        return [f"inv{i}: {head} {_lit(chr(10))} {tail}"]
    rules, parts = [], []
    for j, (key, sub) in enumerate(props.items()):
        is_str = _is_string(sub)
        flag = "true" if is_str else "false"
        value = f"v{i}_{j}"
        rules += (_string_value(value, sub) if is_str else _json_value(value, sub, schema))
        opener = _lit(f'<{DSML}parameter name="{key}" string="{flag}">')
        rules.append(f"p{i}_{j}: {opener} {value}")
        parts.append(f"p{i}_{j}" if key in required else f"p{i}_{j}?")
    return [f"inv{i}: {head} {' '.join(parts)} {tail}", *rules]


def tool_call_grammar(tools: dict[str, dict[str, Any] | None], forced_name: str | None, *,
                      force: bool) -> str:
    """The Lark grammar of the answer (see the module docstring). ``force``: a call must be made
    (``required`` / named); else free text or text then a call (``auto``)."""
    names = [forced_name] if forced_name is not None else list(tools)
    rules = []
    for i, name in enumerate(names):
        rules += _invoke(i, name, tools[name])
    invoke = " | ".join(f"inv{i}" for i in range(len(names)))
    calls = "invoke" if forced_name is not None else "invoke+"
    block_end = _lit(f"</{DSML}tool_calls>")
    top = [f"invoke: ({invoke}) {_lit(chr(10))}"]
    if force:
        top.insert(0, f"start: {_lit(f'{chr(10)}{chr(10)}<{DSML}tool_calls>{chr(10)}')} "
                      f"{calls} {block_end}")
    else:
        top[:0] = [f"start: TEXT | OPEN {calls} {block_end}",
                   "TEXT: /(?s:.*)/ & ~/(?s:.*)｜DSML｜(?s:.*)/",
                   r"OPEN: /(?s:.*)\n\n<｜DSML｜tool_calls>\n/ & "
                   r"~/(?s:.*)｜DSML｜(?s:.*)｜DSML｜tool_calls>\n/"]
    return "\n".join(top + rules) + "\n"
