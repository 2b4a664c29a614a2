"""Reasoning-effort profiles and the OpenAI request -> encoder argument mapping.

Spellings follow ``shared/docs/chat_format.md`` sections 1.5, 1.10 and 4.1; every level the
mapping produces must be accepted by ``encode_messages`` for the same profile.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dsv4.encoding import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    encode_messages,
)
from dsv4.encoding_effort import detect_effort_profile, detect_effort_profile_from_source
from dsv4.encoding_request import encoder_args_from_request, normalize_reasoning_effort

D, U, A = DSML, USER, ASSISTANT


def _u(text: str, **extra) -> dict:
    return {"role": "user", "content": text, **extra}


def _call(name: str, args: str, cid: str = "1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_detect_effort_profile(tmp_path: Path) -> None:
    assert detect_effort_profile_from_source("REASONING_EFFORT_MAX = (") == "preview"
    assert detect_effort_profile_from_source('REASONING_EFFORT_PROMPTS = {"low": ""}') == "0731"
    assert detect_effort_profile_from_source("") == "preview"
    assert detect_effort_profile(None) == "preview"
    assert detect_effort_profile(tmp_path) == "preview"
    (tmp_path / "encoding").mkdir()
    source = tmp_path / "encoding" / "encoding_dsv4.py"
    source.write_text("raise SystemExit('never executed')\nREASONING_EFFORT_MAX = 1\n")
    assert detect_effort_profile(tmp_path) == "preview"
    source.write_text("DEFAULT_REASONING_EFFORT = 'low'\nREASONING_EFFORT_PROMPTS = {}\n")
    assert detect_effort_profile(str(tmp_path)) == "0731"


_EFFORTS = {
    "0731": {None: "high", "minimal": "low", "low": "low", "medium": "high", "high": "high",
             "xhigh": "high", "max": "max", "ultra": "max", " MAX ": "max"},
    "preview": {None: None, "minimal": "high", "low": "high", "medium": "high", "high": "high",
                "xhigh": "max", "max": "max", "ultra": "max"},
}


@pytest.mark.parametrize("profile", sorted(_EFFORTS))
def test_effort_spellings(profile: str) -> None:
    for spelling, level in _EFFORTS[profile].items():
        assert normalize_reasoning_effort(spelling, profile) == level
        args = encoder_args_from_request(
            {"messages": [_u("U")], "reasoning_effort": spelling}, effort_profile=profile)
        assert args["reasoning_effort"] == level and args["thinking_mode"] == "thinking"
        encode_messages(**args)  # every mapped level is accepted by the encoder
    with pytest.raises(ValueError):
        normalize_reasoning_effort("extreme", profile)


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        ({}, "thinking"),
        ({"thinking": {"type": "disabled"}}, "chat"),
        ({"thinking": {"type": "enabled"}, "reasoning_effort": "none"}, "thinking"),
        ({"chat_template_kwargs": {"thinking": False}}, "chat"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat"),
        ({"chat_template_kwargs": {"thinking_mode": "chat"}}, "chat"),
        ({"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"},
         "thinking"),
        ({"reasoning_effort": "none"}, "chat"),
        ({"reasoning": {"effort": "none"}}, "chat"),
        ({"thinking": False}, "chat"),
    ],
)
def test_thinking_switches(fields: dict, mode: str) -> None:
    args = encoder_args_from_request({"messages": [_u("U")], **fields})
    assert args["thinking_mode"] == mode
    if mode == "chat":
        assert args["reasoning_effort"] is None


def test_request_effort_locations_and_errors() -> None:
    base = {"messages": [_u("U")]}
    assert encoder_args_from_request({**base, "reasoning": {"effort": "xhigh"}})[
        "reasoning_effort"] == "max"
    kwargs = {"chat_template_kwargs": {"reasoning_effort": "max", "drop_thinking": False}}
    args = encoder_args_from_request({**base, **kwargs})
    assert (args["reasoning_effort"], args["drop_thinking"]) == ("max", False)
    for bad in ({"reasoning_effort": "turbo"}, {"thinking": {"type": "maybe"}},
                {"reasoning_effort": 3}, {"thinking": {"type": "disabled"},
                                          "reasoning_effort": "turbo"}):
        with pytest.raises(ValueError):
            encoder_args_from_request({**base, **bad})


def test_request_messages_normalized() -> None:
    tools = [{"type": "function", "function": {"name": "f", "strict": False}}]
    request = {
        "messages": [
            {"role": "developer", "content": "Be brief."}, _u("Q"),
            {"role": "assistant", "reasoning": "R", "tool_calls": [_call("f", "{}")]},
            {"role": "tool", "tool_call_id": "1", "content": None},
        ],
        "tools": tools,
    }
    before = copy.deepcopy(request)
    args = encoder_args_from_request(request)
    assert request == before
    msgs = args["messages"]
    assert msgs[0]["role"] == "system" and msgs[2]["reasoning_content"] == "R"
    assert msgs[3]["content"] == ""
    assert args["tools"] == tools
    prompt = encode_messages(**args)
    assert prompt.startswith(f"{BOS}Be brief.\n\n## Tools") and '"strict": false' in prompt
    block = f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n\n</{D}invoke>\n</{D}tool_calls>"
    assert prompt.endswith(f"{THINK_OPEN}R{THINK_CLOSE}{block}{EOS}"
                           + f"{U}<tool_result></tool_result>{A}{THINK_OPEN}")
    native = encoder_args_from_request(request, developer_as_system=False)
    assert native["messages"][0]["role"] == "developer"


def test_request_task_attaches_to_last_user() -> None:
    request = {"messages": [_u("a"), {"role": "assistant", "content": "b"}, _u("c")],
               "task": "query", "thinking": {"type": "disabled"}}
    args = encoder_args_from_request(request)
    assert "task" not in args["messages"][0] and args["messages"][2]["task"] == "query"
    assert encode_messages(**args).endswith(f"{U}c<｜query｜>")
    with pytest.raises(ValueError):
        encoder_args_from_request({"messages": [{"role": "system", "content": "s"}], "task": "x"})
