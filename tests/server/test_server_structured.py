"""Structured outputs over the openai client against the server with the random demo model.

The model writes gibberish, so every valid answer below is the grammar's doing: JSON schemas
(nested objects, arrays, enums, required fields, bounded numbers, string patterns) in chat and
thinking mode, streamed and not; choice, regex and grammar through vLLM's structured_outputs;
the completions endpoint; malformed specs as 400s naming the field.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from server_harness import MODEL, client, module_server  # noqa: F401 (fixtures)

THINK_CLOSE_ID = "128822"  # </think>: biased in thinking mode so the random model answers soon
PERSON = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "role", "address", "scores"],
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "height": {"type": "number", "minimum": 0.5, "maximum": 2.5, "multipleOf": 0.01},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "additionalProperties": False,
                    "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "scores": {"type": "array", "minItems": 1, "maxItems": 4,
                   "items": {"type": "integer", "minimum": -5, "maximum": 5}},
    },
}
RF = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
NO_THINK = {"thinking": {"type": "disabled"}}


srv = module_server(max_num_seqs=8)


def chat(client, thinking=False, stream=False, **kw):
    """-> [(content, finish_reason)] per choice of one chat completion."""
    extra = kw.pop("extra_body", {})
    if not thinking:
        extra = {**NO_THINK, **extra}
    else:
        kw.setdefault("logit_bias", {THINK_CLOSE_ID: 12})
    kw.setdefault("max_tokens", 400)
    r = client.chat.completions.create(model=MODEL, stream=stream, extra_body=extra,
                                       messages=[{"role": "user", "content": "Describe a person"}],
                                       **kw)
    if not stream:
        return [(c.message.content, c.finish_reason) for c in r.choices]
    out = [["", None] for _ in range(kw.get("n", 1))]
    for chunk in r:
        for c in chunk.choices:
            out[c.index][0] += c.delta.content or ""
            out[c.index][1] = c.finish_reason or out[c.index][1]
    return [tuple(o) for o in out]


def one(client, thinking=False, stream=False, **kw):
    (answer,) = chat(client, thinking, stream, **kw)
    return answer


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_validate(client, thinking, stream):
    for content, reason in chat(client, thinking, stream, response_format=RF, seed=1, n=3):
        assert reason == "stop"
        jsonschema.validate(json.loads(content), PERSON)


def test_json_object_and_completions(client):
    content, reason = one(client, response_format={"type": "json_object"}, seed=4)
    assert reason == "stop" and isinstance(json.loads(content), dict)
    r = client.completions.create(model=MODEL, prompt="A person:", max_tokens=400, seed=4,
                                  extra_body={"response_format": RF})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, seed=5,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("thinking", [False, True])
def test_vllm_structured_outputs_fields(client, thinking):
    choices = ["red", "green", "blue"]
    for content, _ in chat(client, thinking, n=3, seed=1,
                           extra_body={"structured_outputs": {"choice": choices}}):
        assert content in choices
    pattern = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
    content, reason = one(client, thinking, seed=4,
                          extra_body={"structured_outputs": {"regex": pattern}})
    assert reason == "stop" and re.fullmatch(pattern, content)
    grammar = 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'
    content, reason = one(client, thinking, seed=5, max_tokens=200,
                          extra_body={"structured_outputs": {"grammar": grammar}})
    assert reason == "stop" and re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", content)
    content, _ = one(client, thinking, stream=True, seed=6,
                     extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(content), PERSON)


def test_free_rows_get_the_same_tokens_beside_constrained_ones(client):
    def free():
        return one(client, temperature=0, max_tokens=24)

    alone = free()
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(one, client, response_format=RF, seed=s) for s in range(4)]
        mixed = [pool.submit(free) for _ in range(2)]
        for f in constrained:
            jsonschema.validate(json.loads(f.result()[0]), PERSON)
        assert [f.result() for f in mixed] == [alone, alone]


def test_a_cut_answer_says_length(client):
    content, reason = one(client, response_format=RF, max_tokens=5, seed=1)
    assert reason == "length" and content.startswith("{")


def _error(fn):
    with pytest.raises(openai.BadRequestError) as err:
        fn()
    return err.value.body


@pytest.mark.parametrize("kw,param", [
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "xml"}), "response_format.type"),
    (dict(extra_body={"structured_outputs": {"regex": "[a-"}}), "structured_outputs.regex"),
    (dict(extra_body={"structured_outputs": {"grammar": "start: undefined_rule"}}),
     "structured_outputs.grammar"),
    (dict(extra_body={"structured_outputs": {"json": "{not json"}}), "structured_outputs.json"),
    (dict(extra_body={"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}),
     "structured_outputs"),
    (dict(extra_body={"structured_outputs": {"jsonn": {}}}), "structured_outputs.jsonn"),
    (dict(response_format={"type": "json_object"},
          extra_body={"structured_outputs": {"regex": "a"}}), "structured_outputs"),
    (dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}),
     "ignore_eos"),
    (dict(response_format={"type": "json_object"}, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]), "response_format"),
])
def test_malformed_specs_are_400_naming_the_field(srv, client, kw, param):
    extra = {**NO_THINK, **kw.pop("extra_body", {})}
    body = _error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
        extra_body=extra, **kw))
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert srv.wait_idle() and not srv.engine_call(lambda e: len(e.structured))
    assert one(client, max_tokens=1)[1] == "length"  # still serving


# ---- tool calls by grammar -------------------------------------------------------------------
SEARCH = {"type": "function", "function": {"name": "search", "strict": True, "parameters": {
    "type": "object", "additionalProperties": False, "required": ["query", "limit", "filters"],
    "properties": {"query": {"type": "string", "maxLength": 20},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                   "filters": {"type": "array", "maxItems": 3,
                               "items": {"enum": ["news", "images", "video"]}},
                   "safe": {"type": "boolean"}}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 16},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}
TOOLS = [SEARCH, WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def calls_of(client, thinking=False, stream=False, **kw):
    """-> [([(name, arguments)], content, finish_reason)] per choice."""
    extra = {} if thinking else NO_THINK
    if thinking:
        kw.setdefault("logit_bias", {THINK_CLOSE_ID: 12})
    kw.setdefault("max_tokens", 400)
    r = client.chat.completions.create(model=MODEL, stream=stream, extra_body=extra,
                                       messages=[{"role": "user", "content": "Help me"}],
                                       tools=TOOLS, **kw)
    if not stream:
        return [([(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []],
                 ch.message.content, ch.finish_reason) for ch in r.choices]
    n = kw.get("n", 1)
    calls, content, reason = [{} for _ in range(n)], [""] * n, [None] * n
    for chunk in r:
        for c in chunk.choices:
            content[c.index] += c.delta.content or ""
            reason[c.index] = c.finish_reason or reason[c.index]
            for tc in c.delta.tool_calls or []:
                name, args = calls[c.index].get(tc.index, ("", ""))
                calls[c.index][tc.index] = (name + (tc.function.name or ""),
                                            args + (tc.function.arguments or ""))
    return [([cs[i] for i in sorted(cs)], content[k] or None, reason[k])
            for k, cs in enumerate(calls)]


def check_calls(calls):
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_parse_and_validate(client, thinking, stream):
    for calls, content, reason in calls_of(client, thinking, stream, tool_choice="required",
                                           seed=1, n=3):
        check_calls(calls)
        assert reason == "tool_calls" and not content


@pytest.mark.parametrize("name", ["search", "get_weather", "get_time"])
def test_a_named_function_is_called_once(client, name):
    for calls, _, reason in calls_of(client, seed=1, n=2, tool_choice={
            "type": "function", "function": {"name": name}}):
        check_calls(calls)
        assert [n for n, _ in calls] == [name] and reason == "tool_calls"


def test_auto_gives_text_or_valid_calls(client):
    for calls, content, _ in calls_of(client, seed=1, n=2, max_tokens=60):
        if calls:
            check_calls(calls)
        assert "｜DSML｜" not in (content or "")


def test_an_uncompilable_tool_schema_is_a_400(srv, client):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "bogus"}}}}}
    body = _error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[bad],
        tool_choice="required", extra_body=NO_THINK))
    assert body["param"] == "tools"
    strict = {"type": "function", "function": {**bad["function"], "strict": True}}
    body = _error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[strict],
        extra_body=NO_THINK))
    assert body["param"] == "tools"
    # auto with a non-strict tool: served as before, calls unconstrained
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       tools=[bad], max_tokens=3, extra_body=NO_THINK)
    assert r.choices[0].finish_reason == "length"
    assert srv.wait_idle()
