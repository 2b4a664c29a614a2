"""Streaming split of DeepSeek-V4 output into reasoning, content and DSML tool-call deltas.

Feed detokenized text (special tokens kept) to ``feed``, then call ``finish``. The start state
comes from the rendered prompt: reasoning iff its last assistant turn ends inside ``<think>``.
Invariants, for any chunking: on every completion the reference parser accepts (tool names and
keys free of DSML/EOS text) the joined reasoning/content deltas and each call's joined argument
deltas equal the reference's strings byte for byte, except R8 values; every call's arguments
are one JSON object; ``content`` never holds ``｜DSML｜``, ``<think>``, ``</think>``, BOS or EOS;
text that may start a marker is held back until decided.

Recovery rules beyond the reference grammar (each has a test):
R1 In reasoning, a tool call ends the reasoning (no ``</think>``): an opener tag (``tool_calls``
   or a damaged name such as ``toolcalls``) followed by an invoke, or a bare invoke whose
   header is complete and followed by a parameter, its end, or is self-closing. Markup merely
   mentioned in prose stays in the reasoning.
R2 A bare ``<｜DSML｜invoke`` in content opens a tool block (the opener was dropped).
   Both openers take up to two newlines before them out of the content.
R3 Stray ``<think>``, ``</think>``, BOS and DSML closing tags are cut out of content (``<think>``
   and BOS also out of reasoning); so is any other ``<｜DSML｜name>`` / ``</｜DSML｜name>`` tag,
   whole, with up to two newlines before it (a damaged wrapper such as ``<｜DSML｜toolcalls>``),
   or a bare ``｜DSML｜`` when no short tag follows.
R4 Text after ``</｜DSML｜tool_calls>`` (or a damaged block end such as ``</｜DSML｜toolcalls>``)
   is content again, so a later block is parsed as well. Whitespace after a block is kept when
   text follows, dropped before EOS, the end or another block.
R5 EOS or end of stream inside a block closes it. A call with a complete header and complete
   parameters is kept, a cut parameter header is dropped, a cut value is closed as it stands and
   ``truncated`` is set.
R6 A value still open at EOS whose text holds ``</｜DSML｜invoke`` ends there (one newline trimmed).
R7 Whitespace inside and between DSML tags is free. An invoke with a malformed header, or a
   parameter with a malformed header, is skipped whole; a repeated key keeps its first value.
R8 A ``string="false"`` value is held until complete and kept verbatim only if it is strict JSON;
   otherwise it is coerced by the declared schema (``tools``) or becomes a JSON string
   (``arguments.py``).
R9 A self-closing invoke (``<｜DSML｜invoke name="f"/>``) is a call with arguments ``{}``.
No tools declared (``tools_enabled=False``): no tool event is ever emitted, yet blocks are still
parsed so their markup never leaks into content (serving.md pain point 1); the calls are kept
in ``suppressed_calls`` for logging. EOS always ends the output; text after it is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsv4.encoding_tokens import (
    BLOCK_OPEN,
    DSML,
    EOS,
    INVOKE_OPEN,
    THINK_CLOSE,
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
    AFTER_BLOCK_DROPS,
    CONTENT_MARKS,
    REASONING_MARKS,
    TAG_OPEN,
    first,
    prompt_ends_in_reasoning,
    reasoning_tool_start,
    safe_end,
    tag_end,
    trim_newlines,
)
from dsv4.server.parsers.tool_block import BLOCK, HEADER, ToolBlockParser

__all__ = [
    "CONTENT", "REASONING", "TOOL_ARGS", "TOOL_CALL", "TOOL_END", "DSV4OutputParser",
    "ParserEvent", "parse_completion", "prompt_ends_in_reasoning",
]

_DONE = "done"


class DSV4OutputParser(ToolBlockParser):
    """Incremental parser; see the module docstring for the grammar and recovery rules."""

    def __init__(
        self, prompt: str | None = None, *, tools_enabled: bool = True,
        in_reasoning: bool | None = None, tools: Mapping[str, Any] | None = None,
    ) -> None:
        if in_reasoning is None:
            in_reasoning = prompt_ends_in_reasoning(prompt or "")
        self.tools_enabled = tools_enabled
        self._init_block(tools)
        self._state = REASONING if in_reasoning else CONTENT
        self._buf = ""
        self._events: list[ParserEvent] = []
        self._after_block = False  # a block just closed: whitespace waits for what follows (R4)
        self._stash = ""  # content held over a block: it may join the text after it
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
        self._state, self._after_block = CONTENT, True

    # -- state machine ---------------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        handlers = {REASONING: self._reasoning, CONTENT: self._content,
                    **self._block_handlers()}
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
        if mark == TAG_OPEN:
            verdict, skip = reasoning_tool_start(rest)
            if verdict is None and not final:  # undecided: hold from the newlines before it
                end = len(trim_newlines(buf[:pos]))
                self._emit(REASONING, buf[:end])
                self._buf = buf[end:]
                return False
            if verdict:  # R1
                self._emit(REASONING, trim_newlines(buf[:pos]))
                self._buf = rest[skip:]
                self._state = HEADER if rest.startswith("invoke") else BLOCK
                self.notes.append("tool call started inside reasoning")
                return True
            self._emit(REASONING, buf[:pos + len(mark)])
            self._buf = rest
            return True
        self.notes.append(f"dropped {mark!r} from reasoning")  # R3: splice, then rescan
        self._buf = buf[:pos] + rest
        return True

    def _content(self, final: bool) -> bool:
        buf = self._buf
        if self._after_block:  # R4: whitespace after a block is kept before text only
            text = buf.lstrip()
            if not final and (not text or any(m.startswith(text) for m in AFTER_BLOCK_DROPS)):
                return False
            if not text or text.startswith(AFTER_BLOCK_DROPS):
                buf = text
            buf = self._buf = self._stash + buf
            self._stash, self._after_block = "", False
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
            self._state = BLOCK if mark == BLOCK_OPEN else HEADER
            if mark == INVOKE_OPEN:
                self.notes.append("tool_calls opener missing before invoke")  # R2
            return True
        if mark == DSML and buf[:pos].endswith(("<", "</")):  # R3: a whole tag, maybe damaged
            start = pos - 2 if buf[:pos].endswith("</") else pos - 1
            size = tag_end(rest)
            if size is None and not final:  # undecided: hold from the newlines before it
                keep = safe_end(buf[:start], CONTENT_MARKS)
                self._emit(CONTENT, buf[:keep])
                self._buf = buf[keep:]
                return False
            if size != -1:
                end = len(buf) if size is None else pos + len(mark) + size
                self.notes.append(f"dropped tag {buf[start:end]!r} from content")
                before = trim_newlines(buf[:start])  # commit what streaming would have sent
                keep = safe_end(before, CONTENT_MARKS, newlines=0)
                self._emit(CONTENT, before[:keep])
                self._buf = before[keep:] + buf[end:]
                return True
        self.notes.append(f"dropped {mark!r} from content")  # R3: splice, then rescan
        self._buf = buf[:pos] + rest
        return True


def parse_completion(
    text: str, prompt: str | None = None, *, tools_enabled: bool = True,
    in_reasoning: bool | None = None, tools: Mapping[str, Any] | None = None,
) -> DSV4OutputParser:
    """Run the tolerant parser over a whole completion; read ``result()`` and ``notes``."""
    parser = DSV4OutputParser(prompt, tools_enabled=tools_enabled, in_reasoning=in_reasoning,
                              tools=tools)
    parser.feed(text)
    parser.finish()
    return parser
