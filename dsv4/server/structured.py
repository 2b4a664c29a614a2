"""Structured-output request fields -> one StructuredOutputsParams, checked before the engine.

``response_format`` (OpenAI): ``text``, ``json_object``, ``json_schema`` (``strict`` accepted;
the schema is always enforced, strict or not). ``structured_outputs`` (vLLM's extra body field):
exactly one of ``json``, ``regex``, ``choice``, ``grammar`` (Lark in llguidance's dialect, or
GBNF), ``json_object``. Both on one request, or either together with tools the model may call,
is a 400. The spec is compiled here (cached, shared with the engine), so a schema, regex or
grammar the backend rejects is a 400 naming the field and never reaches the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from dsv4.errors import InvalidRequestError
from dsv4.server.protocol import APIError
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams

__all__ = ["structured_spec", "tool_spec", "with_response_format"]

logger = logging.getLogger(__name__)

# vLLM's structured_outputs keys that dsv4 accepts without effect: it never falls back to another
# backend, and JSON never has free whitespace
_NO_EFFECT = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")
_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _from_response_format(fmt: dict[str, Any]) -> tuple[StructuredOutputsParams | None, str]:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True), "response_format"
    if kind != "json_schema":
        raise APIError(400, f"response_format type must be 'text', 'json_object' or "
                       f"'json_schema', not {kind!r}", param="response_format.type")
    body = fmt.get("json_schema")
    if not isinstance(body, dict):
        raise APIError(400, "response_format json_schema needs a 'json_schema' object with a "
                       "'schema'", param="response_format.json_schema")
    schema = body.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                       param="response_format.json_schema.schema")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(400, "response_format.json_schema.strict must be a boolean",
                       param="response_format.json_schema.strict")
    return StructuredOutputsParams(json=schema), "response_format.json_schema.schema"


def _from_structured_outputs(fields: dict[str, Any]) -> tuple[StructuredOutputsParams, str]:
    for key in fields:
        if key not in _KEYS and key not in _NO_EFFECT:
            raise APIError(400, f"structured_outputs.{key} is not supported (use one of "
                           f"{', '.join(_KEYS)})", param=f"structured_outputs.{key}")
    given = {k: fields[k] for k in _KEYS if fields.get(k) is not None}
    spec = StructuredOutputsParams(**given)  # InvalidRequestError naming the field
    return spec, f"structured_outputs.{spec.kind}"


def tool_spec(compiler: GrammarCompiler, grammar: str, *, strict: bool
              ) -> StructuredOutputsParams | None:
    """The spec of a tool-call grammar (``dsv4.server.grammar``), compiled. A parameters schema
    the backend cannot compile is a 400 naming ``tools`` when ``strict`` (a forced call, or a
    function declared strict); otherwise the calls go unconstrained (None), as before."""
    spec = StructuredOutputsParams(grammar=grammar)
    try:
        compiler.check(spec, param="tools")
    except InvalidRequestError as exc:
        if strict:
            raise APIError(400, str(exc), param="tools") from None
        logger.warning("tool schemas do not compile, calls are not constrained: %s", exc)
        return None
    return spec


def with_response_format(raw: dict[str, Any]) -> dict[str, Any]:
    """The chat body with a JSON ``response_format`` also told to the model, as V4's format
    does it: on the first system message (a new one at the front when there is none), unless a
    message already carries one. The grammar enforces it either way."""
    fmt = raw.get("response_format")
    messages = raw.get("messages")
    if (not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema")
            or not isinstance(messages, list)
            or any(isinstance(m, dict) and m.get("response_format") for m in messages)):
        return raw
    at = next((i for i, m in enumerate(messages)
               if isinstance(m, dict) and m.get("role") == "system"), None)
    messages = list(messages)
    if at is None:
        messages.insert(0, {"role": "system", "content": "", "response_format": fmt})
    else:
        messages[at] = {**messages[at], "response_format": fmt}
    return {**raw, "messages": messages}


def structured_spec(req: Any, compiler: GrammarCompiler, *, tools_enabled: bool = False
                    ) -> StructuredOutputsParams | None:
    """The request's output constraint (None: free text), compiled; 400 naming the field."""
    fmt = getattr(req, "response_format", None)
    fields = getattr(req, "structured_outputs", None)
    spec, param = _from_response_format(fmt) if fmt is not None else (None, "")
    if fields is not None:
        if spec is not None:
            raise APIError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")
        spec, param = _from_structured_outputs(fields)
    if spec is None:
        return None
    if tools_enabled:
        name = param.split(".")[0]
        raise APIError(400, f"{name} cannot be combined with tools the model may call; send "
                       "tool_choice 'none' or leave the tools out", param=name)
    try:
        compiler.check(spec, param=param)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    return spec
