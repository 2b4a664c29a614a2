"""Marker sets and hold-back helpers for the streaming DeepSeek-V4 output parser.

A streaming decision is taken only once it cannot change: a marker counts only when no longer
candidate that starts earlier is still incomplete at the end of the buffer, and text that may
be the start of a marker (plus up to two newlines before it, which a tool-block opener takes
with it) is held back. Decisions therefore never depend on how the text was chunked.
"""

from __future__ import annotations

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
# dropped from content wherever they appear (R3); the longer tags win over bare ｜DSML｜
STRAYS = (BLOCK_CLOSE, f"</{DSML}invoke>", PARAM_CLOSE, DSML, THINK_OPEN, THINK_CLOSE, BOS)
REASONING_MARKS = (THINK_CLOSE, BLOCK_OPEN, EOS, THINK_OPEN, BOS)
CONTENT_MARKS = (BLOCK_OPEN, INVOKE_OPEN, EOS) + STRAYS
BLOCK_MARKS = (INVOKE_OPEN, BLOCK_CLOSE, EOS, BLOCK_OPEN)
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


def opener_verdict(rest: str) -> bool | None:
    """After ``<｜DSML｜tool_calls`` in reasoning: a real block (">", whitespace, invoke)?

    None means undecided yet (more text needed).
    """
    if not rest:
        return None
    if rest[0] != ">":
        return False
    after = rest[1:].lstrip()
    if after.startswith(INVOKE_OPEN):
        return True
    return None if INVOKE_OPEN.startswith(after) else False
