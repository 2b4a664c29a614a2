"""Streaming split of DeepSeek-V4 output into reasoning, content and DSML tool-call deltas.

Feed detokenized text (special tokens kept) to ``feed``, then call ``finish``. The start state
comes from the rendered prompt: reasoning iff its last assistant turn ends inside ``<think>``.
Invariants, for any chunking: on every completion the reference parser accepts (tool names and
keys free of DSML/EOS text) the joined reasoning/content deltas and each call's joined argument
deltas equal the reference's strings byte for byte; ``content`` never holds ``｜DSML｜``,
``<think>``, ``</think>``, BOS or EOS; text that may start a marker is held back until decided.

Recovery rules beyond the reference grammar (each has a test):
R1 In reasoning, ``<｜DSML｜tool_calls>`` plus an invoke ends the reasoning (no ``</think>``).
R2 A bare ``<｜DSML｜invoke`` in content opens a tool block (the opener was dropped).
   Both openers take up to two newlines before them out of the content.
R3 Stray ``<think>``, ``</think>``, BOS, DSML closing tags and any other ``｜DSML｜`` are cut out
   of content (``<think>`` and BOS also out of reasoning).
R4 Text after ``</｜DSML｜tool_calls>`` is content again (leading whitespace dropped), so a later
   block is parsed as well.
R5 EOS or end of stream inside a block closes it. A call with a complete header and complete
   parameters is kept, a cut parameter header is dropped, a cut value is closed as it stands and
   ``truncated`` is set.
R6 A value still open at EOS whose text holds ``</｜DSML｜invoke`` ends there (one newline trimmed).
R7 Whitespace inside and between DSML tags is free. An invoke with a malformed header, or a
   parameter with a malformed header, is skipped whole; a repeated key keeps its first value.
No tools declared (``tools_enabled=False``): no tool event is ever emitted, yet blocks are still
parsed so their markup never leaks into content (serving.md pain point 1); the calls are kept
in ``suppressed_calls`` for logging. EOS always ends the output; text after it is ignored.
"""

from __future__ import annotations

import re
from typing import Any

from dsv4.encoding_tokens import (
    BLOCK_CLOSE,
    BLOCK_OPEN,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_END,
    PARAM_OPEN,
    THINK_CLOSE,
    to_json,
)
from dsv4.server.parsers.events import (
    CONTENT,
    REASONING,
    TOOL_ARGS,
    TOOL_CALL,
    TOOL_END,
    ParserEvent,
)
from dsv4.server.parsers.markers import (
    AFTER_PARAM_MARKS,
    BLOCK_MARKS,
    CONTENT_MARKS,
    HEADER_MARKS,
    PHEADER_ABORTS,
    REASONING_MARKS,
    SKIP_INVOKE_MARKS,
    SKIP_PARAM_MARKS,
    VALUE_HOLD,
    first,
    held,
    json_escape,
    opener_verdict,
    prompt_ends_in_reasoning,
    safe_end,
    trim_newlines,
)

__all__ = [
    "CONTENT", "REASONING", "TOOL_ARGS", "TOOL_CALL", "TOOL_END", "DSV4OutputParser",
    "ParserEvent", "parse_completion", "prompt_ends_in_reasoning",
]

_BLOCK, _HEADER, _PHEADER, _VALUE, _AFTER, _SKIP_PARAM, _SKIP_INVOKE, _DONE = (
    "block", "header", "param_header", "value", "after_param", "skip_param", "skip_invoke", "done"
)
_HEADER_RE = re.compile(r'\s*name\s*=\s*"(.*)"\s*>\s*\Z', re.S)
_PARAM_RE = re.compile(r'\s*name\s*=\s*"(.*?)"\s*string\s*=\s*"(true|false)"\s*>', re.S)


class DSV4OutputParser:
    """Incremental parser; see the module docstring for the grammar and recovery rules."""

    def __init__(
        self, prompt: str | None = None, *, tools_enabled: bool = True,
        in_reasoning: bool | None = None,
    ) -> None:
        if in_reasoning is None:
            in_reasoning = prompt_ends_in_reasoning(prompt or "")
        self.tools_enabled = tools_enabled
        self._state = REASONING if in_reasoning else CONTENT
        self._buf = ""
        self._events: list[ParserEvent] = []
        self._strip_ws = False  # drop whitespace that follows a closed block (R4)
        self._stash = ""  # content held over a block: it may join the text after it
        self._call = -1  # index of the open call, -1 when none is open
        self._count = 0  # calls started so far
        self._keys: set[str] = set()
        self._is_str = False
        self._finished = False
        self.truncated = False
        self.notes: list[str] = []  # what was dropped or repaired, for logs
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self._calls: list[tuple[str, list[str]]] = []
        self._suppressed: list[tuple[str, list[str]]] = []

    # -- public API ------------------------------------------------------------------------------

    def feed(self, text: str) -> list[ParserEvent]:
        """Consume a text delta; return the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._state == _DONE:
            if text:
                self.notes.append("text after EOS ignored")
            return []
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[ParserEvent]:
        """End of generation: flush held text and close whatever block is open."""
        if not self._finished:
            self._run(final=True)
            self._finished = True
        return self._take()

    @property
    def reasoning_content(self) -> str:
        return "".join(self._reasoning_parts)

    @property
    def content(self) -> str:
        return "".join(self._content_parts)

    @property
    def calls(self) -> list[dict[str, str]]:
        """Tool calls so far as ``{"name", "arguments"}`` (the last may still be growing)."""
        return [{"name": name, "arguments": "".join(parts)} for name, parts in self._calls]

    @property
    def suppressed_calls(self) -> list[dict[str, str]]:
        """Calls the model wrote although no tools were enabled (never reported as events)."""
        return [{"name": name, "arguments": "".join(parts)} for name, parts in self._suppressed]

    @property
    def has_tool_calls(self) -> bool:
        """Whether any tool call was reported (finish_reason "tool_calls")."""
        return bool(self._calls)

    def result(self) -> dict[str, Any]:
        """Aggregate in the reference parser's shape (call ids are the server's job)."""
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": [{"type": "function", "function": dict(c)} for c in self.calls],
        }

    # -- emission --------------------------------------------------------------------------------

    def _take(self) -> list[ParserEvent]:
        events, self._events = self._events, []
        return events

    def _emit(self, kind: str, text: str = "") -> None:
        if not text and kind in (REASONING, CONTENT, TOOL_ARGS):
            return
        if kind == REASONING:
            self._reasoning_parts.append(text)
        elif kind == CONTENT:
            self._content_parts.append(text)
        else:
            sink = self._calls if self.tools_enabled else self._suppressed
            if kind == TOOL_CALL:
                sink.append((text, []))
            elif kind == TOOL_ARGS:
                sink[-1][1].append(text)
            if not self.tools_enabled:
                return
        index = self._call if kind in (TOOL_CALL, TOOL_ARGS, TOOL_END) else -1
        last = self._events[-1] if self._events else None
        if last and kind in (REASONING, CONTENT, TOOL_ARGS) and last.kind == kind \
                and last.index == index:
            self._events[-1] = ParserEvent(kind, last.text + text, index)
        else:
            self._events.append(ParserEvent(kind, text, index))

    def _open_call(self, name: str) -> None:
        self._call, self._count = self._count, self._count + 1
        self._keys = set()
        self._emit(TOOL_CALL, name)
        self._emit(TOOL_ARGS, "{")

    def _close_call(self) -> None:
        if self._call >= 0:
            self._emit(TOOL_ARGS, "}")
            self._emit(TOOL_END)
            self._call = -1

    def _end(self, rest: str = "") -> None:
        """EOS (or end of stream): close any open call, flush stashed content, and stop."""
        self._close_call()
        if self._stash:
            self._emit(CONTENT, self._stash)
            self._stash = ""
        if rest:
            self.notes.append("text after EOS ignored")
        self._buf, self._state = "", _DONE

    def _to_content_after_block(self) -> None:
        self._state, self._strip_ws = CONTENT, True

    # -- state machine ---------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        handlers = {
            REASONING: self._reasoning, CONTENT: self._content, _BLOCK: self._block,
            _HEADER: self._header, _PHEADER: self._param_header, _VALUE: self._value,
            _AFTER: self._after_param, _SKIP_PARAM: self._skip_param,
            _SKIP_INVOKE: self._skip_invoke,
        }
        while self._state != _DONE and handlers[self._state](final):
            pass
        if final and self._state != _DONE:
            self._end()

    def _reasoning(self, final: bool) -> bool:
        buf = self._buf
        pos, mark = first(buf, REASONING_MARKS, final)
        if mark is None:
            end = len(buf) if final else safe_end(buf, REASONING_MARKS)
            self._emit(REASONING, buf[:end])
            self._buf = buf[end:]
            return False
        rest = buf[pos + len(mark):]
        if mark == EOS:
            self._emit(REASONING, buf[:pos])
            self._end(rest)
            return False
        if mark == THINK_CLOSE:
            self._emit(REASONING, buf[:pos])
            self._buf, self._state = rest, CONTENT
            return True
        if mark == BLOCK_OPEN:
            verdict = opener_verdict(rest)
            if verdict is None and not final:  # undecided: hold from the newlines before it
                end = len(trim_newlines(buf[:pos]))
                self._emit(REASONING, buf[:end])
                self._buf = buf[end:]
                return False
            if verdict:  # R1
                self._emit(REASONING, trim_newlines(buf[:pos]))
                self._buf, self._state = rest, _BLOCK
                self.notes.append("tool block opened inside reasoning")
                return True
            self._emit(REASONING, buf[:pos + len(mark)])
            self._buf = rest
            return True
        self.notes.append(f"dropped {mark!r} from reasoning")  # R3: splice, then rescan
        self._buf = buf[:pos] + rest
        return True

    def _content(self, final: bool) -> bool:
        buf = self._buf
        if self._strip_ws:
            buf = buf.lstrip()
            if not buf:
                self._buf = buf
                return False
            buf = self._buf = self._stash + buf
            self._stash, self._strip_ws = "", False
        pos, mark = first(buf, CONTENT_MARKS, final)
        if mark is None:
            end = safe_end(buf, CONTENT_MARKS)
            if final:
                if DSML in buf[end:]:
                    self.notes.append(f"dropped unfinished markup {buf[end:]!r}")
                else:
                    end = len(buf)
            self._emit(CONTENT, buf[:end])
            self._buf = buf[end:]
            return False
        rest = buf[pos + len(mark):]
        if mark == EOS:
            self._emit(CONTENT, buf[:pos])
            self._end(rest)
            return False
        if mark in (BLOCK_OPEN, INVOKE_OPEN):
            before = trim_newlines(buf[:pos])
            keep = safe_end(before, CONTENT_MARKS, newlines=0)  # may join text after the block
            self._emit(CONTENT, before[:keep])
            self._stash = before[keep:]
            self._buf = rest
            self._state = _BLOCK if mark == BLOCK_OPEN else _HEADER
            if mark == INVOKE_OPEN:
                self.notes.append("tool_calls opener missing before invoke")  # R2
            return True
        self.notes.append(f"dropped {mark!r} from content")  # R3: splice, then rescan
        self._buf = buf[:pos] + rest
        return True

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
            self._state = _HEADER
        elif mark == BLOCK_CLOSE:
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
                if match:  # R5: a complete header cut at the end
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
            self._state = _HEADER
        elif mark == BLOCK_CLOSE:
            self._to_content_after_block()
        else:
            self._state = _BLOCK
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
            self._is_str = flag == "true"
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
                self._buf, self._state = buf[invoke_pos + len(INVOKE_CLOSE):], _BLOCK
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
        else:
            self._emit(TOOL_ARGS, text)

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
            self._state = _BLOCK
        return True


def parse_completion(
    text: str, prompt: str | None = None, *, tools_enabled: bool = True,
    in_reasoning: bool | None = None,
) -> DSV4OutputParser:
    """Run the tolerant parser over a whole completion; read ``result()`` and ``notes``."""
    parser = DSV4OutputParser(prompt, tools_enabled=tools_enabled, in_reasoning=in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser
