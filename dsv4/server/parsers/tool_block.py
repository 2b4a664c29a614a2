"""The DSML tool-block half of the streaming output parser: invoke headers, parameters, values.

``ToolBlockParser`` is mixed into ``DSV4OutputParser``, which owns the buffer, the emission of
events and the reasoning/content states; the methods here run while the parser is inside a
``<｜DSML｜tool_calls>`` block (or a recovered one) and hand back to content when it closes.
The recovery rules they carry out (R4-R9) are listed in ``output_parser``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dsv4.encoding_tokens import (
    BLOCK_CLOSE,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_END,
    PARAM_OPEN,
    to_json,
)
from dsv4.server.parsers.arguments import param_types, value_json
from dsv4.server.parsers.events import TOOL_ARGS, TOOL_CALL, TOOL_END
from dsv4.server.parsers.markers import (
    AFTER_PARAM_MARKS,
    BLOCK_MARKS,
    HEADER_MARKS,
    PHEADER_ABORTS,
    SKIP_INVOKE_MARKS,
    SKIP_PARAM_MARKS,
    TAG_CLOSE_OPEN,
    VALUE_HOLD,
    first,
    held,
    json_escape,
    tag_end,
    trim_newlines,
)

__all__ = ["BLOCK", "HEADER", "ToolBlockParser"]

BLOCK, HEADER, _PHEADER, _VALUE, _AFTER, _SKIP_PARAM, _SKIP_INVOKE = (
    "block", "header", "param_header", "value", "after_param", "skip_param", "skip_invoke"
)
_HEADER_RE = re.compile(r'\s*name\s*=\s*"(.*)"\s*(/\s*)?>\s*\Z', re.S)
_PARAM_RE = re.compile(r'\s*name\s*=\s*"(.*?)"\s*string\s*=\s*"(true|false)"\s*>', re.S)


class ToolBlockParser:
    """Tool-block states of the output parser (a mixin; the host supplies the members below)."""

    _buf: str
    _state: str
    notes: list[str]
    truncated: bool

    def _emit(self, kind: str, text: str = "") -> None:
        raise NotImplementedError

    def _end(self, rest: str = "") -> None:
        raise NotImplementedError

    def _to_content_after_block(self) -> None:
        raise NotImplementedError

    def _init_block(self, tools: Mapping[str, Any] | None) -> None:
        self._schemas = tools or {}  # tool name -> parameters schema, for value repair
        self._call = -1  # index of the open call, -1 when none is open
        self._count = 0  # calls started so far
        self._keys: set[str] = set()
        self._name = ""  # the open call's tool name
        self._is_str = False
        self._types: frozenset[str] = frozenset()  # declared types of the open non-string value
        self._raw = ""  # the open non-string value, held until it is complete

    def _block_handlers(self) -> dict[str, Any]:
        return {
            BLOCK: self._block, HEADER: self._header, _PHEADER: self._param_header,
            _VALUE: self._value, _AFTER: self._after_param, _SKIP_PARAM: self._skip_param,
            _SKIP_INVOKE: self._skip_invoke,
        }

    def _open_call(self, name: str) -> None:
        self._call, self._count = self._count, self._count + 1
        self._keys, self._name = set(), name
        self._emit(TOOL_CALL, name)
        self._emit(TOOL_ARGS, "{")

    def _close_call(self) -> None:
        if self._call >= 0:
            self._emit(TOOL_ARGS, "}")
            self._emit(TOOL_END)
            self._call = -1

    def _block(self, final: bool) -> bool:
        pos, mark = first(self._buf, BLOCK_MARKS, final)
        if mark is None:
            self._note_filler(self._buf[:len(self._buf) - held(self._buf, BLOCK_MARKS)])
            self._buf = self._buf[len(self._buf) - held(self._buf, BLOCK_MARKS):]
            return False
        self._note_filler(self._buf[:pos])
        rest = self._buf[pos + len(mark):]
        self._buf = rest
        if mark == EOS:
            self._end(rest)
            return False
        if mark == INVOKE_OPEN:
            self._state = HEADER
        elif mark == BLOCK_CLOSE:
            self._to_content_after_block()
        elif mark == TAG_CLOSE_OPEN:  # a damaged block end closes the block, a stray end is filler
            size = tag_end(rest)
            if size is None and not final:
                self._buf = mark + rest
                return False
            name = rest[:size - 1] if size and size > 0 else ""
            if name and not name.strip().startswith(("invoke", "parameter")):
                self.notes.append(f"damaged block end {mark + rest[:size]!r}")
                self._buf = rest[size:]
                self._to_content_after_block()
        return True  # a repeated opener is ignored

    def _note_filler(self, filler: str) -> None:
        if filler.strip().lstrip(">").strip():
            self.notes.append(f"dropped text inside tool block: {filler!r}")

    def _header(self, final: bool) -> bool:
        buf = self._buf
        pos, mark = first(buf, HEADER_MARKS, final)
        if mark is None:
            if final:
                match = _HEADER_RE.match(buf[:len(buf) - held(buf, HEADER_MARKS)])
                if match:  # R5: a complete header cut at the end (or a self-closing invoke)
                    self._open_call(match.group(1))
                self._end()
            return False
        match = _HEADER_RE.match(buf[:pos])
        rest = buf[pos + len(mark):]
        if match is None:
            self.notes.append(f"malformed invoke header {buf[:pos]!r} skipped")
            if mark == PARAM_OPEN:
                self._buf, self._state = rest, _SKIP_INVOKE
                return True
        else:
            self._open_call(match.group(1))
            if match.group(2) and mark == INVOKE_OPEN:  # R9: self-closed, the next one follows
                self._close_call()
                self._buf, self._state = rest, HEADER
                return True
        return self._after_invoke_mark(mark, rest)

    def _after_invoke_mark(self, mark: str, rest: str) -> bool:
        """Shared transition once an invoke header or a parameter has ended at ``mark``."""
        self._buf = rest
        if mark == PARAM_OPEN:
            self._state = _PHEADER
            return True
        self._close_call()
        if mark == EOS:
            self._end(rest)
            return False
        if mark == INVOKE_OPEN:
            self.notes.append("invoke not closed before the next one")
            self._state = HEADER
        elif mark == BLOCK_CLOSE:
            self._to_content_after_block()
        else:
            self._state = BLOCK
        return True

    def _param_header(self, final: bool) -> bool:
        buf = self._buf
        match = _PARAM_RE.match(buf)
        pos, mark = first(buf, PHEADER_ABORTS, final)
        if match and (mark is None or match.end() <= pos):
            key, flag = match.group(1), match.group(2)
            self._buf = buf[match.end():]
            if key in self._keys:
                self.notes.append(f"repeated parameter {key!r} skipped")
                self._state = _SKIP_PARAM
                return True
            self._is_str, self._raw = flag == "true", ""
            self._types = param_types(self._schemas.get(self._name), key)
            piece = (", " if self._keys else "") + to_json(key) + ": "
            self._emit(TOOL_ARGS, piece + ('"' if self._is_str else ""))
            self._keys.add(key)
            self._state = _VALUE
            return True
        if mark is not None:
            self.notes.append(f"malformed parameter header {buf[:pos]!r} skipped")
            skip = len(mark) if mark == PARAM_END else 0
            self._buf, self._state = buf[pos + skip:], _AFTER
            return True
        if final:
            self._end()
        return False

    def _value(self, final: bool) -> bool:
        buf = self._buf
        end_pos, eos_pos = buf.find(PARAM_END), buf.find(EOS)
        if end_pos != -1 and (eos_pos == -1 or end_pos < eos_pos):
            value = buf[:end_pos]
            if value.endswith("<"):
                value = value[:-1]
            elif value.endswith("<\n"):
                value = value[:-2]
            self._emit_value(value, close=True)
            self._buf, self._state = buf[end_pos + len(PARAM_END):], _AFTER
            return True
        if eos_pos != -1 or final:
            stop = eos_pos if eos_pos != -1 else len(buf)
            invoke_pos = buf.find(INVOKE_CLOSE, 0, stop)
            if invoke_pos != -1:  # R6
                self.notes.append("parameter not closed before </invoke>")
                self._emit_value(trim_newlines(buf[:invoke_pos], 1), close=True)
                self._close_call()
                self._buf, self._state = buf[invoke_pos + len(INVOKE_CLOSE):], BLOCK
                return True
            self.truncated = True  # R5
            self.notes.append("tool call cut inside a parameter value")
            self._emit_value(buf[:stop], close=True)
            self._end(buf[stop + len(EOS):] if eos_pos != -1 else "")
            return False
        end = len(buf) - held(buf, VALUE_HOLD)
        invoke_pos = buf.find(INVOKE_CLOSE)
        if invoke_pos != -1:  # maybe R6: wait until the value's end is known
            end = min(end, invoke_pos)
        if end and buf[end - 1] == "\n":  # R6 would take it off
            end -= 1
        self._emit_value(buf[:end], close=False)
        self._buf = buf[end:]
        return False

    def _emit_value(self, text: str, close: bool) -> None:
        if self._is_str:
            self._emit(TOOL_ARGS, json_escape(text) + ('"' if close else ""))
            return
        self._raw += text  # a non-string value is checked whole (arguments.py)
        if close:
            value = value_json(self._raw, self._types)
            if value != self._raw:
                self.notes.append(f"non-JSON value {self._raw!r} given as {value}")
            self._emit(TOOL_ARGS, value)

    def _after_param(self, final: bool) -> bool:
        pos, mark = first(self._buf, AFTER_PARAM_MARKS, final)
        if mark is None:
            keep = held(self._buf, AFTER_PARAM_MARKS)
            self._note_filler(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._note_filler(self._buf[:pos])
        return self._after_invoke_mark(mark, self._buf[pos + len(mark):])

    def _skip_param(self, final: bool) -> bool:
        pos, mark = first(self._buf, SKIP_PARAM_MARKS, final)
        if mark is None:
            self._buf = self._buf[len(self._buf) - held(self._buf, SKIP_PARAM_MARKS):]
            return False
        rest = self._buf[pos + len(mark):]
        if mark == EOS:
            self._end(rest)
            return False
        self._buf, self._state = rest, _AFTER
        return True

    def _skip_invoke(self, final: bool) -> bool:
        pos, mark = first(self._buf, SKIP_INVOKE_MARKS, final)
        if mark is None:
            self._buf = self._buf[len(self._buf) - held(self._buf, SKIP_INVOKE_MARKS):]
            return False
        rest = self._buf[pos + len(mark):]
        self._buf = rest
        if mark == EOS:
            self._end(rest)
            return False
        if mark == BLOCK_CLOSE:
            self._to_content_after_block()
        else:
            self._state = BLOCK
        return True
