"""Output-parser repairs a client needs (issue 15 item 6), each fed whole, per character, in
pairs, in random pieces and per V4 token (``parser_harness.parse_all``): every ``arguments``
string is one JSON object (R8), damaged wrappers leave no residue (R3, R4), a call that starts
inside reasoning without a proper opener is recovered (R1), a self-closing invoke is a call
(R9), and whitespace after a block survives when text follows (R4).
"""

from __future__ import annotations

import json

import pytest
from parser_harness import BLOCK_F, F_CALL, INV_F, parse_all, strict_json

from dsv4.encoding import DSML, EOS, THINK_CLOSE


def _block(*invokes: str) -> str:
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _invoke(name: str, *params: tuple[str, str, str]) -> str:
    body = "".join(f'<{DSML}parameter name="{k}" string="{flag}">{v}</{DSML}parameter>\n'
                   for k, flag, v in params)
    return f'<{DSML}invoke name="{name}">\n{body}</{DSML}invoke>'


def _args(msg: dict) -> list[str]:
    return [c["function"]["arguments"] for c in msg["tool_calls"]]


@pytest.mark.parametrize("value", ["[broken", "hello", "NaN", "1e999", "-Infinity", "[1, NaN]",
                                   '{"x": 1e400}', "", "tru", "1 2"])
def test_non_json_value_becomes_a_json_string(value: str) -> None:
    text = _block(_invoke("f", ("a", "false", value), ("b", "true", "v"))) + EOS
    msg, parser = parse_all(text)
    assert _args(msg) == ['{"a": ' + json.dumps(value, ensure_ascii=False) + ', "b": "v"}']
    assert strict_json(_args(msg)[0]) == {"a": value, "b": "v"} and parser.notes


@pytest.mark.parametrize("value", [" 1 ", "1.50", '{"k":[1, 2]}', "null", "-0", "true",
                                   "123456789012345678901234567890", '"quoted"', "1e308"])
def test_json_value_is_kept_verbatim(value: str) -> None:
    msg, parser = parse_all(_block(_invoke("f", ("a", "false", value))) + EOS)
    assert _args(msg) == ['{"a": ' + value + "}"] and not parser.notes


SCHEMAS = {"f": {"type": "object", "properties": {
    "s": {"type": "string"}, "n": {"type": "number"}, "i": {"type": "integer"},
    "b": {"type": "boolean"}, "o": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    "t": {"type": ["boolean", "string"]}}}}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("s", "hello world", '"hello world"'), ("s", "[broken", '"[broken"'), ("s", "7", "7"),
    ("n", "+1.5", "1.5"), ("n", ".5", "0.5"), ("n", "2.", "2"), ("n", "NaN", '"NaN"'),
    ("n", "1e999", '"1e999"'), ("i", "+7", "7"), ("i", " +42\n", "42"), ("i", "4.5x", '"4.5x"'),
    ("b", "True", "true"), ("b", "FALSE", "false"), ("b", "yes", '"yes"'), ("o", "None", "null"),
    ("o", "+3", "3"), ("t", "True", "true"), ("t", "maybe", '"maybe"'), ("x", "+3", '"+3"'),
])
def test_value_coerced_by_declared_schema(key: str, value: str, expected: str) -> None:
    text = _block(_invoke("f", (key, "false", value))) + EOS
    msg, _ = parse_all(text, tools=SCHEMAS)
    assert _args(msg) == ["{" + json.dumps(key) + ": " + expected + "}"]
    strict_json(_args(msg)[0])
    other, _ = parse_all(text.replace('"f"', '"g"'), tools=SCHEMAS)  # no schema for g
    plain = value if value == "7" else json.dumps(value)  # "7" is the one JSON value here
    assert _args(other) == ["{" + json.dumps(key) + ": " + plain + "}"]


def test_cut_non_string_value_is_valid_json() -> None:
    head = f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
    msg, parser = parse_all(head + f'<{DSML}parameter name="a" string="false">[1, 2')
    assert _args(msg) == ['{"a": "[1, 2"}'] and parser.truncated
    msg, parser = parse_all(head + f'<{DSML}parameter name="a" string="false">[1, 2]')
    assert _args(msg) == ['{"a": [1, 2]}'] and parser.truncated


@pytest.mark.parametrize("name", ["toolcalls", "function_calls", " SugarPanel", "tool_calls "])
def test_damaged_wrapper_leaves_no_residue(name: str) -> None:
    block = f"\n\n<{DSML}{name}>\n{INV_F}\n</{DSML}{name}>"
    msg, parser = parse_all(f"Sure.{block}{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("Sure.", F_CALL) and parser.notes
    msg, _ = parse_all(f"Sure.{block}\n\nDone.{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("Sure.\n\nDone.", F_CALL)
    msg, _ = parse_all(f"plan{block}\n{EOS}", thinking=True)
    assert (msg["reasoning_content"], msg["content"], msg["tool_calls"]) == ("plan", "", F_CALL)


def test_stray_damaged_tags_are_cut_whole() -> None:
    msg, _ = parse_all(f"a <{DSML}toolcalls> b </{DSML}x> c{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("a  b  c", [])
    long_name = "y" * 50  # too long for a tag: only the marker goes
    msg, _ = parse_all(f"a <{DSML}{long_name}> b<{DSML}cut")
    assert msg["content"] == f"a <{long_name}> b"


@pytest.mark.parametrize("opener", ["", f"<{DSML}toolcalls>\n", f"<{DSML}function_calls>\n"])
def test_invoke_without_opener_in_reasoning(opener: str) -> None:
    text = f"Let me check.\n\n{opener}{INV_F}\n{EOS}"
    thinking, parser = parse_all(text, thinking=True)
    assert (thinking["reasoning_content"], thinking["content"]) == ("Let me check.", "")
    assert thinking["tool_calls"] == F_CALL and parser.notes
    chat, _ = parse_all(text)  # the same text in content
    assert (chat["content"], chat["tool_calls"]) == ("Let me check.", F_CALL)


@pytest.mark.parametrize("mention", [
    f'I could use <{DSML}invoke name="f"> for this.',
    f"A <{DSML}toolcalls> tag is not a call.",
    f'<{DSML}invoke name="f">\nthen prose',
])
def test_markup_mentioned_in_reasoning_stays_there(mention: str) -> None:
    msg, _ = parse_all(f"{mention}{THINK_CLOSE}ok{EOS}", thinking=True)
    assert (msg["reasoning_content"], msg["content"], msg["tool_calls"]) == (mention, "ok", [])


SUBMIT = [{"type": "function", "function": {"name": "submit", "arguments": "{}"}}]


@pytest.mark.parametrize("invoke", [f'<{DSML}invoke name="submit"/>',
                                    f'<{DSML}invoke  name = "submit" / >',
                                    f'<{DSML}invoke name="submit"/>\n</{DSML}invoke>'])
def test_self_closing_invoke(invoke: str) -> None:
    msg, _ = parse_all(f"Done.{_block(invoke)}{EOS}")
    assert (msg["content"], msg["tool_calls"]) == ("Done.", SUBMIT)
    msg, parser = parse_all(f"Done.{_block(invoke, invoke, INV_F, invoke)}{EOS}")
    assert msg["tool_calls"] == SUBMIT * 2 + F_CALL + SUBMIT and not parser.notes
    msg, _ = parse_all(f"Done.\n\n{invoke}")  # bare, cut by the end of the stream
    assert (msg["content"], msg["tool_calls"]) == ("Done.", SUBMIT)
    msg, _ = parse_all(f"plan\n\n{invoke}\n{EOS}", thinking=True)
    assert (msg["reasoning_content"], msg["tool_calls"]) == ("plan", SUBMIT)


def test_whitespace_after_a_block_is_kept() -> None:
    text = f"Example:\n```{BLOCK_F[1:]}\n```\nAfter it.{EOS}"
    msg, _ = parse_all(text)
    assert (msg["content"], msg["tool_calls"]) == ("Example:\n```\n```\nAfter it.", F_CALL)
    msg, _ = parse_all(f"A{BLOCK_F} \n\t{EOS}")  # before EOS or the end it is dropped
    assert msg["content"] == "A"
    msg, _ = parse_all(f"A{BLOCK_F}\n\n")
    assert msg["content"] == "A"
