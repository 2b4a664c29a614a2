"""Marker sets and hold-back helpers for the streaming DeepSeek-V4 output parser.

A streaming decision is taken only once it cannot change: a marker counts only when no longer
candidate that starts earlier is still incomplete at the end of the buffer, and text that may
be the start of a marker (plus up to two newlines before it, which a tool-block opener takes
with it) is held back. Decisions therefore never depend on how the text was chunked.
"""

from __future__ import annotations

import re

from dsv4.encoding_tokens import (
    ASSISTANT,
    BLOCK_CLOSE,
    BLOCK_OPEN,
    BOS,
    DSML,
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_END,
    PARAM_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    to_json,
)

PARAM_CLOSE = f"</{DSML}parameter>"
TAG_OPEN = f"<{DSML}"  # any DSML tag, damaged ones included
TAG_CLOSE_OPEN = f"</{DSML}"
TAG_NAME_MAX = 40  # a damaged tag's name (``toolcalls``, `` SugarPanel``) is at most this long
# dropped from content wherever they appear (R3); the longer tags win over bare ｜DSML｜
STRAYS = (BLOCK_CLOSE, f"</{DSML}invoke>", PARAM_CLOSE, DSML, THINK_OPEN, THINK_CLOSE, BOS)
REASONING_MARKS = (THINK_CLOSE, TAG_OPEN, EOS, THINK_OPEN, BOS)
CONTENT_MARKS = (BLOCK_OPEN, INVOKE_OPEN, EOS) + STRAYS
BLOCK_MARKS = (INVOKE_OPEN, BLOCK_CLOSE, EOS, BLOCK_OPEN, TAG_CLOSE_OPEN)
AFTER_BLOCK_DROPS = (BLOCK_OPEN, INVOKE_OPEN, EOS)  # whitespace before these is not kept
HEADER_MARKS = (PARAM_OPEN, INVOKE_CLOSE, INVOKE_OPEN, BLOCK_CLOSE, EOS)
PHEADER_ABORTS = (PARAM_END, PARAM_OPEN, INVOKE_CLOSE, INVOKE_OPEN, BLOCK_CLOSE, EOS)
VALUE_ENDS = (f"<{PARAM_END}", f"<\n{PARAM_END}", PARAM_END)
VALUE_HOLD = VALUE_ENDS + (EOS, INVOKE_CLOSE)
AFTER_PARAM_MARKS = (PARAM_OPEN, INVOKE_CLOSE, INVOKE_OPEN, BLOCK_CLOSE, EOS)
SKIP_PARAM_MARKS = (PARAM_END, EOS)
SKIP_INVOKE_MARKS = (INVOKE_CLOSE, BLOCK_CLOSE, EOS)


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """True when generation continues inside ``<think>`` (the last assistant turn opened it)."""
    if ASSISTANT not in prompt:
        return False
    tail = prompt[prompt.rfind(ASSISTANT) + len(ASSISTANT):]
    return THINK_OPEN in tail and tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def held(buf: str, marks: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of some marker."""
    best = 0
    for mark in marks:
        for size in range(min(len(mark) - 1, len(buf)), best, -1):
            if buf.endswith(mark[:size]):
                best = size
                break
    return best


def first(buf: str, marks: tuple[str, ...], final: bool) -> tuple[int, str | None]:
    """Earliest complete marker (longest on a tie), or (-1, None) if none or still undecided."""
    best, hit = -1, None
    for mark in marks:
        pos = buf.find(mark)
        if pos != -1 and (hit is None or pos < best or (pos == best and len(mark) > len(hit))):
            best, hit = pos, mark
    if hit is not None and not final and len(buf) - held(buf, marks) < best:
        return -1, None  # an earlier, longer marker may still be completing
    return best, hit


def trim_newlines(text: str, limit: int = 2) -> str:
    """``text`` without up to ``limit`` trailing newlines."""
    for _ in range(limit):
        if text.endswith("\n"):
            text = text[:-1]
    return text


def safe_end(buf: str, marks: tuple[str, ...], newlines: int = 2) -> int:
    """How much of ``buf`` can be emitted now.

    Held back: a suffix that may start a marker, up to ``newlines`` newlines before it (a block
    opener takes them), and, cascading, text before those that also ends like a marker start
    (dropping a stray marker later would join the two).
    """
    end = len(buf)
    while True:
        size = held(buf[:end], marks)
        if size:
            end -= size
        elif newlines and end and buf[end - 1] == "\n":
            end, newlines = end - 1, newlines - 1
        else:
            return end


def json_escape(text: str) -> str:
    """JSON string-body escaping; per character, so escaping chunks equals escaping the whole."""
    return to_json(text)[1:-1]


def tag_end(rest: str) -> int | None:
    """``rest`` follows ``<｜DSML｜`` or ``</｜DSML｜``: the length of the tag's remainder up to and
    including ``>``, -1 when it is no tag (a newline or ``<`` first, or a name too long), None
    while undecided."""
    for i, char in enumerate(rest[:TAG_NAME_MAX + 1]):
        if char == ">":
            return i + 1
        if char in "<\n":
            return -1
    return None if len(rest) <= TAG_NAME_MAX else -1


_INVOKE_HEAD_RE = re.compile(r'\s*name\s*=\s*"[^"\n]*"\s*(/\s*)?>')
_NAME_MAX = 120  # how far an invoke header in reasoning may run before it is taken for prose


def _invoke_verdict(rest: str) -> bool | None:
    """After ``<｜DSML｜invoke`` in reasoning: a complete header followed by a parameter or the
    invoke's end (or a self-closing header) is a call; None while undecided."""
    match = _INVOKE_HEAD_RE.match(rest)
    if match is None:
        return None if ">" not in rest and len(rest) <= _NAME_MAX else False
    if match.group(1):
        return True
    tail = rest[match.end():].lstrip()
    if tail.startswith((PARAM_OPEN, INVOKE_CLOSE)):
        return True
    return None if PARAM_OPEN.startswith(tail) or INVOKE_CLOSE.startswith(tail) else False


def reasoning_tool_start(rest: str) -> tuple[bool | None, int]:
    """After ``<｜DSML｜`` in reasoning: does a tool call start here (R1)?

    -> (verdict, skip), verdict None while undecided. On True, ``rest[skip:]`` is what the
    tool-block parser reads next: an invoke header's attributes after a bare ``invoke``, or the
    block after an opener tag (``tool_calls`` or a damaged name) that an invoke follows.
    """
    if rest.startswith("invoke"):
        return _invoke_verdict(rest[len("invoke"):]), len("invoke")
    if "invoke".startswith(rest):
        return None, 0
    end = tag_end(rest)
    if end is None or end == -1:
        return (None if end is None else False), 0
    after = rest[end:].lstrip()
    if after.startswith(INVOKE_OPEN):
        return True, end
    return (None if INVOKE_OPEN.startswith(after) else False), 0
