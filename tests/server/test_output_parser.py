"""Streaming output parser: reference equivalence under any chunking, hold-back, recovery rules.

Every completion the strict reference parser accepts must stream to the same reasoning, content
and tool-call arguments, byte for byte, however the text is split into deltas. Each recovery rule
(R1-R7 in the parser's docstring) and the no-tools mode has its own test; R8, R9 and the
damaged-markup cases of R1, R3 and R4 are in test_output_parser_repairs.py.
"""

from __future__ import annotations

import json
import random

import pytest
from conftest import CHAT_DATA, CHAT_EXAMPLES
from parser_harness import BLOCK_F, F_CALL, INV_F, chunkings, parse_all, stream, strict_json

from dsv4.encoding import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    THINK_CLOSE,
    THINK_OPEN,
    encode_messages,
    parse_message_from_completion_text,
    render_tool_calls,
)
from dsv4.server.parsers import (
    CONTENT,
    REASONING,
    TOOL_ARGS,
    TOOL_CALL,
    TOOL_END,
    DSV4OutputParser,
    ParserEvent,
    parse_completion,
    prompt_ends_in_reasoning,
)

EXAMPLES, DATA = CHAT_EXAMPLES, CHAT_DATA
FORBIDDEN = (DSML, THINK_OPEN, THINK_CLOSE, BOS, EOS)


def _fixture_completions() -> dict[str, tuple[str, str]]:
    """id -> (raw completion, thinking_mode): parse vectors plus golden assistant turns."""
    cases = {o["id"]: (o["raw_output"], o["thinking_mode"]) for o in DATA.get("parse_vectors", [])}
    for g in DATA.get("official_golden_fixtures", []):
        opener = ASSISTANT + (THINK_OPEN if g["thinking_mode"] == "thinking" else THINK_CLOSE)
        for n, turn in enumerate(g["expected_prompt"].split(opener)[1:]):
            cases[f"{g['id']}-turn{n}"] = (turn.split(EOS)[0] + EOS, g["thinking_mode"])
    return cases


FIXTURES = _fixture_completions()


def assert_streams_like_reference(text: str, mode: str) -> None:
    expected = parse_message_from_completion_text(text, mode)
    for chunks in chunkings(text):
        got, parser, _ = stream(chunks, in_reasoning=mode == "thinking")
        assert got == expected, chunks
        assert not parser.truncated and not parser.notes


@pytest.mark.skipif(not FIXTURES, reason="shared/data/dsv4_chat_examples.json not found")
@pytest.mark.parametrize("case", sorted(FIXTURES) or ["missing"])
def test_fixture_completions_stream_like_reference(case: str) -> None:
    text, mode = FIXTURES[case]
    assert_streams_like_reference(text, mode)


def _random_completion(rng: random.Random) -> tuple[str, str]:
    mode = rng.choice(["chat", "thinking"])
    texts = ["", "ok", "a\nb", "x < y", 'say "hi"', "中文", "\n", "tab\there", "2\\3", "/"]
    text = (rng.choice(texts) + THINK_CLOSE) if mode == "thinking" else ""
    text += rng.choice(texts + ["lead\n\n\n", "end\n"])
    if rng.random() < 0.7:
        calls = []
        for _ in range(rng.randint(1, 3)):
            args = {k: rng.choice(texts + [1, -2.5, True, None, [1, "a"], {"k": "v"}])
                    for k in rng.sample(["a", "b", "city", "n_2"], rng.randint(0, 3))}
            raw = json.dumps(args) if rng.random() < 0.8 else "not json"
            calls.append({"function": {"name": rng.choice(["f", "get_weather"]), "arguments": raw}})
        text += render_tool_calls(calls)
    return text + (EOS if rng.random() < 0.9 else ""), mode


def test_generated_completions_stream_like_reference() -> None:
    rng = random.Random(1234)
    for _ in range(120):
        text, mode = _random_completion(rng)
        try:
            parse_message_from_completion_text(text, mode)
        except ValueError:  # e.g. plain content without EOS
            continue
        assert_streams_like_reference(text, mode)


# --- start state and hold-back ----------------------------------------------------------------

USER = [{"role": "user", "content": "Hi <think>"}]


def test_prompt_ends_in_reasoning() -> None:
    assert prompt_ends_in_reasoning(encode_messages(USER, "thinking"))
    assert not prompt_ends_in_reasoning(encode_messages(USER, "chat"))
    prefix = USER + [{"role": "assistant", "reasoning_content": "r", "content": "x",
                      "prefix": True}]
    assert not prompt_ends_in_reasoning(encode_messages(prefix, "thinking"))
    action = [{"role": "user", "content": "q", "task": "action"}]
    assert prompt_ends_in_reasoning(encode_messages(action, "thinking"))
    assert not prompt_ends_in_reasoning("raw text <think>")
    assert not prompt_ends_in_reasoning("")


def test_start_state_follows_prompt() -> None:
    text = f"r{THINK_CLOSE}c{EOS}"
    thinking = DSV4OutputParser(encode_messages(USER, "thinking"))
    thinking.feed(text)
    thinking.finish()
    assert (thinking.reasoning_content, thinking.content) == ("r", "c")
    chat = parse_completion(f"c{EOS}", encode_messages(USER, "chat"))
    assert (chat.reasoning_content, chat.content) == ("", "c")


def _kinds(events: list[ParserEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.text) for e in events]


def test_partial_markers_are_held_back() -> None:
    p = DSV4OutputParser(in_reasoning=True)
    assert _kinds(p.feed("thinking </thi")) == [(REASONING, "thinking ")]
    assert _kinds(p.feed("nk>Hello\n")) == [(CONTENT, "Hello")]
    assert p.feed("\n<｜DS") == []
    assert p.feed(f'ML｜tool_calls>\n<{DSML}invoke name="f">\n') == []
    assert _kinds(p.feed(f'<{DSML}parameter name="a" string="true">x"y</{DSML}para')) == [
        (TOOL_CALL, "f"), (TOOL_ARGS, '{"a": "x\\"y')]
    assert _kinds(p.feed(f"meter>\n</{DSML}invoke>\n</{DSML}tool_calls><｜end▁of")) == [
        (TOOL_ARGS, '"}'), (TOOL_END, "")]
    assert p.feed("▁sentence｜>") == [] and p.feed("ignored") == []
    assert p.finish() == [] and p.has_tool_calls
    assert p.result()["tool_calls"][0]["function"]["arguments"] == '{"a": "x\\"y"}'


def test_held_text_is_released() -> None:
    p = DSV4OutputParser(in_reasoning=False)
    assert _kinds(p.feed("a\n\n")) == [(CONTENT, "a")]
    assert _kinds(p.feed("b <")) == [(CONTENT, "\n\nb ")]
    assert _kinds(p.feed("= c")) == [(CONTENT, "<= c")]
    assert _kinds(p.feed("\n")) == []
    assert _kinds(p.finish()) == [(CONTENT, "\n")]


def test_lifecycle() -> None:
    p = DSV4OutputParser(in_reasoning=False)
    assert _kinds(p.feed(f"x{EOS}")) == [(CONTENT, "x")]
    assert p.finish() == [] and p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("more")


# --- recovery rules ---------------------------------------------------------------------------

def test_r1_tool_block_inside_reasoning() -> None:
    msg, parser = parse_all(f"plan it{BLOCK_F}{EOS}", thinking=True)
    assert (msg["reasoning_content"], msg["content"], msg["tool_calls"]) == ("plan it", "", F_CALL)
    assert parser.notes
    mention = f"I could write a <{DSML}tool_calls> block here.{THINK_CLOSE}ok{EOS}"
    msg, _ = parse_all(mention, thinking=True)
    assert msg["reasoning_content"] == mention.split(THINK_CLOSE)[0]
    assert (msg["content"], msg["tool_calls"]) == ("ok", [])


def test_r2_invoke_without_opener() -> None:
    msg, _ = parse_all(f"Sure.\n\n{INV_F}{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("Sure.", F_CALL)
    msg, _ = parse_all(f"Sure.\n\n{INV_F}\n{INV_F}\n</{DSML}tool_calls>{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("Sure.", F_CALL * 2)


@pytest.mark.parametrize(
    ("text", "thinking", "reasoning", "content"),
    [
        (f"a{THINK_CLOSE}b{EOS}", False, "", "ab"),
        (f"a{THINK_OPEN}b{THINK_CLOSE}c{THINK_CLOSE}d{EOS}", True, "ab", "cd"),
        (f"x</{DSML}tool_calls>y</{DSML}invoke>z{DSML}w{BOS}!{EOS}", False, "", "xyzw!"),
        (f"keep <think about it{EOS}", False, "", "keep <think about it"),
    ],
    ids=["close_in_content", "duplicate_think_tags", "stray_dsml_and_bos", "lookalike_kept"],
)
def test_r3_stray_markup_dropped(text: str, thinking: bool, reasoning: str, content: str) -> None:
    msg, _ = parse_all(text, thinking)
    assert (msg["reasoning_content"], msg["content"]) == (reasoning, content)


def test_r4_text_and_blocks_after_a_block() -> None:
    msg, _ = parse_all(f"intro{BLOCK_F}\n\n  then more{BLOCK_F}\n \n{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("intro\n\n  then more", F_CALL * 2)


def test_r5_cut_blocks() -> None:
    head = f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"f\">\n"
    param_a = f'<{DSML}parameter name="a" string="true">v</{DSML}parameter>\n'
    msg, parser = parse_all(head + param_a + EOS)  # complete parameters, then EOS
    assert msg["tool_calls"] == F_CALL and not parser.truncated
    msg, parser = parse_all(head + param_a + f'<{DSML}parameter name="b" str')  # cut header
    assert msg["tool_calls"] == F_CALL and not parser.truncated
    msg, parser = parse_all(head + f'<{DSML}parameter name="a" string="true">par')  # cut value
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": "par"}' and parser.truncated
    empty = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    msg, _ = parse_all(head + EOS)  # invoke header only
    assert msg["tool_calls"] == empty
    msg, _ = parse_all(head + f"<{DSML}para")  # invoke header, then a cut tag
    assert msg["tool_calls"] == empty
    msg, _ = parse_all(f"answer{head[:-8]}")  # cut inside the invoke header
    assert (msg["content"], msg["tool_calls"]) == ("answer", [])


def test_r6_value_closed_by_invoke_end() -> None:
    text = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="a" '
            f'string="true">v\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}')
    msg, parser = parse_all(text)
    assert msg["tool_calls"] == F_CALL and not parser.truncated and parser.notes
    closed_later = text.replace(EOS, f"</{DSML}parameter>{EOS}")  # reference reading kept
    msg, _ = parse_all(closed_later)
    args = msg["tool_calls"][0]["function"]["arguments"]
    assert args.startswith('{"a": "v\\n</') and args.endswith('tool_calls>"}')


def test_r7_lenient_whitespace_and_skips() -> None:
    loose = (f"\n\n<{DSML}tool_calls>\n\n <{DSML}invoke  name = \"f\" >\n"
             f'<{DSML}parameter  name="a"  string="false" > 1 </{DSML}parameter>\n\n'
             f"</{DSML}invoke>\n</{DSML}tool_calls>{EOS}")
    msg, _ = parse_all(loose)
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a":  1 }'
    bad_invoke = f"<{DSML}invoke nmae=f>\n<{DSML}parameter name=\"a\" string=\"true\">v" \
                 f"</{DSML}parameter>\n</{DSML}invoke>\n"
    msg, parser = parse_all(f"\n\n<{DSML}tool_calls>\n{bad_invoke}{INV_F}\n</{DSML}tool_calls>")
    assert msg["tool_calls"] == F_CALL and parser.notes
    bad_param = f"<{DSML}parameter name=a>oops</{DSML}parameter>\n"
    dup = f'<{DSML}parameter name="a" string="true">second</{DSML}parameter>\n'
    inv = INV_F.replace(f'<{DSML}parameter name="a"', bad_param + f'<{DSML}parameter name="a"')
    inv = inv.replace(f"</{DSML}invoke>", dup + f"</{DSML}invoke>")
    msg, _ = parse_all(f"\n\n<{DSML}tool_calls>\n{inv}\n</{DSML}tool_calls>{EOS}")
    assert msg["tool_calls"] == F_CALL


def test_no_tools_declared() -> None:
    msg, parser = parse_all(f"Answer.{BLOCK_F}{EOS}", tools_enabled=False)
    assert (msg["content"], msg["tool_calls"]) == ("Answer.", [])
    assert not parser.has_tool_calls
    assert parser.suppressed_calls == [{"name": "f", "arguments": '{"a": "v"}'}]
    _, _, events = stream(list(f"r{BLOCK_F}{EOS}"), in_reasoning=True, tools_enabled=False)
    assert {e.kind for e in events} == {REASONING}
    msg, _ = parse_all(f"plain <b>text</b> a<b{EOS}", tools_enabled=False)
    assert msg["content"] == "plain <b>text</b> a<b"


# --- invariants on arbitrary text -------------------------------------------------------------

_SOUP = ["a", "b c", "\n", "\n\n", "<", ">", '"', "=", "/", "中", "{", "1", EOS, BOS,
         THINK_OPEN, THINK_CLOSE, DSML, f"<{DSML}tool_calls>", f"</{DSML}tool_calls>",
         f"<{DSML}invoke", f'<{DSML}invoke name="f">', f"</{DSML}invoke>",
         f"<{DSML}parameter", f'<{DSML}parameter name="k" string="true">',
         f'<{DSML}parameter name="n" string="false">', f"</{DSML}parameter>", ' name="x">',
         ' string="true">', "<\n", "<｜end▁of", "▁sentence｜>", "<｜DS", "ML｜",
         f"<{DSML}toolcalls>", f"</{DSML} SugarPanel>", f'<{DSML}invoke name="s"/>', "NaN",
         "[broken", "1e999", "</"]


def test_invariants_on_arbitrary_text() -> None:
    rng = random.Random(99)
    for _ in range(250):
        text = "".join(rng.choice(_SOUP) for _ in range(rng.randint(1, 40)))
        for thinking in (False, True):
            for tools in (True, False):
                msg, _ = parse_all(text, thinking, tools_enabled=tools)
                assert not any(tok in msg["content"] for tok in FORBIDDEN), text
                for call in msg["tool_calls"]:
                    assert isinstance(strict_json(call["function"]["arguments"]), dict), text
                if not tools:
                    assert msg["tool_calls"] == []
