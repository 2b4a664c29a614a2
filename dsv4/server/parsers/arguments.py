"""JSON text for a ``string="false"`` parameter value: the model's own text when it is strict
JSON, else a repair that is always valid JSON.

The reference parser copies a non-string value verbatim, so ``[broken``, ``hello``, ``NaN`` or
``1e999`` would make the whole ``arguments`` string unparseable. Here a value is kept verbatim
only when it is strict JSON (no NaN/Infinity, no number that overflows to infinity). Otherwise,
when the request declared the parameter's type (``string``, ``integer``, ``number`` or
``boolean``, also inside ``anyOf``/``oneOf`` or a type list), the text is coerced to that type as
vLLM does; what still does not fit becomes a JSON string of the text as written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from dsv4.encoding_tokens import to_json

__all__ = ["param_types", "value_json"]

_INT_RE = re.compile(r"[+-]?\d+\Z")
_NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} overflows")
    return value


def is_strict_json(text: str) -> bool:
    """Whether ``text`` is one JSON value by RFC 8259 (no NaN/Infinity, finite numbers)."""
    try:
        json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except ValueError:  # JSONDecodeError, the constants above, too many digits for an int
        return False
    except RecursionError:  # nesting deeper than Python's stack: not ours to repair
        return False
    return True


def param_types(schema: Mapping[str, Any] | None, key: str) -> frozenset[str]:
    """The JSON types a tool's ``parameters`` schema declares for property ``key`` (may be
    empty: no schema, no such property, or no type given)."""
    if not isinstance(schema, Mapping):
        return frozenset()
    props = schema.get("properties")
    prop = props.get(key) if isinstance(props, Mapping) else None
    if not isinstance(prop, Mapping):
        return frozenset()
    types: set[str] = set()
    for part in [prop, *(prop.get("anyOf") or []), *(prop.get("oneOf") or [])]:
        declared = part.get("type") if isinstance(part, Mapping) else None
        if isinstance(declared, str):
            types.add(declared)
        elif isinstance(declared, list):
            types.update(t for t in declared if isinstance(t, str))
    return frozenset(types)


def _coerce(text: str, types: frozenset[str]) -> str | None:
    """``text`` as JSON of one of ``types``, or None when it fits none of them."""
    word = text.strip()
    if "integer" in types and _INT_RE.match(word):
        return str(int(word))
    if "number" in types and _NUMBER_RE.match(word):
        value = float(word)
        if math.isfinite(value):
            return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if "boolean" in types and word.lower() in ("true", "false"):
        return word.lower()
    if "null" in types and word.lower() in ("null", "none"):
        return "null"
    return None


def value_json(text: str, types: frozenset[str] = frozenset()) -> str:
    """JSON text for a non-string parameter value; see the module docstring."""
    if is_strict_json(text):
        return text
    coerced = _coerce(text, types)
    return coerced if coerced is not None else to_json(text)
