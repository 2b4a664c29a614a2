"""POST /v1/messages and /v1/messages/count_tokens with the official anthropic client.

Scripted outputs (server_harness) make the model say exact text, so thinking, text and DSML
tool calls travel through the real detokenizer and output parser. Every request's rendered
prompt is compared byte for byte with the chat-completions rendering of the same conversation
(one rendering path), and every error comes back in Anthropic's shape.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from server_harness import (  # noqa: F401 (fixtures)
    MODEL, ServerHandle, chat_prompt, module_server, script, thinks)

from dsv4.encoding import DSML

D = DSML
KEY = "sk-test"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather",
                                                 "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}
CALL = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'</{D}invoke>\n</{D}tool_calls>')
HI = [{"role": "user", "content": "Hi"}]
NO_THINK = {"type": "disabled"}


srv = module_server(api_key=KEY)


@pytest.fixture
def client(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=60)


def test_plain_message_thinks_by_default(srv, client, script):
    script(lambda p: "Greeting.</think>Hello!" if thinks(p) else None)
    r = client.messages.create(model=MODEL, max_tokens=32, messages=HI)
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking == "Greeting." and r.content[1].text == "Hello!"
    assert r.id.startswith("msg_") and r.role == "assistant" and r.model == MODEL
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    prompt = srv.runner.prompts[-1]
    assert r.usage.input_tokens == len(srv.tokenizer.encode(prompt))
    assert r.usage.output_tokens > 0 and r.usage.cache_read_input_tokens == 0
    assert prompt == chat_prompt(srv, messages=HI)


@pytest.mark.parametrize("system", ["Be brief.", [{"type": "text", "text": "Be"},
                                                  {"type": "text", "text": "brief."}]])
def test_system_prompt_and_thinking_disabled(srv, client, script, system):
    script(lambda p: "Short." if not thinks(p) else None)
    r = client.messages.create(model=MODEL, max_tokens=16, system=system, thinking=NO_THINK,
                               messages=HI)
    assert [(b.type, b.text) for b in r.content] == [("text", "Short.")]
    text = system if isinstance(system, str) else "Be\n\nbrief."
    assert srv.runner.prompts[-1] == chat_prompt(
        srv, messages=[{"role": "system", "content": text}, *HI],
        extra_body={"thinking": NO_THINK})


def test_thinking_enabled_with_budget_and_effort(srv, client, script):
    script(lambda p: "Hmm.</think>Yes." if thinks(p) else None)
    r = client.messages.create(model=MODEL, max_tokens=32, messages=HI,
                               thinking={"type": "enabled", "budget_tokens": 1024},
                               extra_body={"output_config": {"effort": "max"}})
    assert [b.type for b in r.content] == ["thinking", "text"]
    # effort "max" is mapped as chat completions maps reasoning_effort="max"
    assert srv.runner.prompts[-1] == chat_prompt(srv, messages=HI, reasoning_effort="max")
    assert srv.runner.prompts[-1] != chat_prompt(srv, messages=HI)


def test_agent_shaped_request_is_accepted(srv, client, script):
    """What coding agents send: cache_control on system, message and tool blocks, a JSON
    Schema with $schema, metadata, temperature 1 (cache_control has no effect yet)."""
    script(lambda p: "Listing.</think>Done." if thinks(p) else None)
    ephemeral = {"type": "ephemeral"}
    bash = {"name": "Bash", "description": "Run a command", "cache_control": ephemeral,
            "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#",
                             "type": "object", "additionalProperties": False,
                             "properties": {"command": {"type": "string"}},
                             "required": ["command"]}}
    r = client.messages.create(
        model=MODEL, max_tokens=64, metadata={"user_id": "u1"}, tools=[bash],
        extra_body={"temperature": 1, "cache_control": ephemeral},
        system=[{"type": "text", "text": "You are an agent.", "cache_control": ephemeral}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "ls",
                                                "cache_control": ephemeral}]}])
    assert [b.type for b in r.content] == ["thinking", "text"] and r.content[1].text == "Done."


def test_stream_helper_collects_the_message(srv, client, script):
    script(lambda p: "Let me see.</think>Hello there, friend!" if thinks(p) else None)
    with client.messages.stream(model=MODEL, max_tokens=32, messages=HI) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop",
            "message_delta"} <= set(types)
    assert final.content[0].thinking == "Let me see." and final.content[0].signature
    assert final.content[1].text == "Hello there, friend!"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_raw_event_sequence(srv, script):
    script(lambda p: "Hi!" if not thinks(p) else None)
    with httpx.Client(base_url=srv.url, headers={"x-api-key": KEY}) as http:
        r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": HI,
                                            "thinking": NO_THINK, "stream": True})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_forced_tool_use_input_validates(srv, client):
    """tool_choice any on the random model: the forced call (generated under the tool-call
    grammar) has an input that fits input_schema."""
    r = client.messages.create(model=MODEL, max_tokens=48, tools=[WEATHER], thinking=NO_THINK,
                               tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "Weather in Paris?"}])
    calls = [b for b in r.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].id.startswith("toolu_")
    schema = WEATHER["input_schema"]
    assert set(calls[0].input) <= set(schema["properties"]) and "city" in calls[0].input
    assert all(isinstance(v, str) for v in calls[0].input.values())
    assert r.stop_reason in ("tool_use", "max_tokens")


def test_tool_use_then_tool_result_round_trip(srv, client, script):
    script(lambda p: "Need weather.</think>Checking." + CALL if thinks(p) else None)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.messages.create(model=MODEL, max_tokens=96, tools=[WEATHER], messages=ask)
    assert [b.type for b in r.content] == ["thinking", "text", "tool_use"]
    call = r.content[2]
    assert (call.name, call.input, r.stop_reason) == ("get_weather", {"city": "Paris"},
                                                       "tool_use")
    script(lambda p: "Done.</think>Sunny." if thinks(p) else None)
    result = {"type": "tool_result", "tool_use_id": call.id, "is_error": False,
              "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "21C"}]}
    history = [*ask, {"role": "assistant", "content": r.content},
               {"role": "user", "content": [result]}]
    r2 = client.messages.create(model=MODEL, max_tokens=32, tools=[WEATHER], messages=history)
    assert r2.content[-1].text == "Sunny." and r2.stop_reason == "end_turn"
    assert srv.runner.prompts[-1] == chat_prompt(srv, tools=[CHAT_WEATHER], messages=[
        *ask,
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.",
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny\n\n21C"}])


def test_named_tool_in_thinking_mode_comes_after_the_reasoning(srv, client, script):
    """A named tool in thinking mode: the reasoning is free, the call under the tool-call
    grammar follows it (the scripted model writes both; a reasoning that used up max_tokens
    would leave no call, as the README says)."""
    script(lambda p: "Weather it is.</think>" + CALL if thinks(p) else None)
    r = client.messages.create(model=MODEL, max_tokens=64, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               messages=[{"role": "user", "content": "Paris?"}])
    assert r.content[0].type == "thinking"
    assert [b.name for b in r.content if b.type == "tool_use"] == ["get_weather"]


def test_final_assistant_turn_is_a_prefill(srv, client, script):
    script(lambda p: " four." if p.endswith("The answer is") else None)
    history = [*HI, {"role": "assistant", "content": "The answer is"}]
    r = client.messages.create(model=MODEL, max_tokens=8, thinking=NO_THINK, messages=history)
    assert r.content[0].text == " four." and r.stop_reason == "end_turn"
    assert srv.runner.prompts[-1] == chat_prompt(srv, messages=[
        *HI, {"role": "assistant", "content": "The answer is", "prefix": True}],
        extra_body={"thinking": NO_THINK})


def test_tool_use_streams_input_json(srv, client, script):
    script(lambda p: CALL if not thinks(p) else None)
    with client.messages.stream(model=MODEL, max_tokens=96, tools=[WEATHER],
                                thinking=NO_THINK, messages=HI) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in deltas
    assert [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Paris"})]
    assert final.stop_reason == "tool_use"


def test_stop_sequence_and_max_tokens(srv, client, script):
    script(lambda p: "alpha STOP beta gamma delta epsilon" if not thinks(p) else None)
    r = client.messages.create(model=MODEL, max_tokens=32, thinking=NO_THINK, messages=HI,
                               stop_sequences=["STOP"])
    assert (r.stop_reason, r.stop_sequence, r.content[0].text) == ("stop_sequence", "STOP",
                                                                  "alpha ")
    r = client.messages.create(model=MODEL, max_tokens=2, thinking=NO_THINK, messages=HI)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2


def test_count_tokens_is_the_rendered_prompt_length(srv, client, script):
    script(lambda p: "Ok." if not thinks(p) else None)
    kw = dict(model=MODEL, system="Be brief.", tools=[WEATHER], thinking=NO_THINK,
              messages=[{"role": "user", "content": "Weather in Paris?"}])
    counted = client.messages.count_tokens(**kw).input_tokens
    r = client.messages.create(max_tokens=8, **kw)
    total = r.usage.input_tokens + r.usage.cache_read_input_tokens  # cached ones are apart
    assert counted == total == len(srv.tokenizer.encode(srv.runner.prompts[-1]))


def _error(call) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as info:
        call()
    body = info.value.body
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return info.value


def test_error_shapes(srv, client):
    def create(c=client, **kw):
        return lambda: c.messages.create(**{"model": MODEL, "max_tokens": 8, "messages": HI,
                                            **kw})

    err = _error(create(max_tokens=0))
    assert err.status_code == 400 and err.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err.body["error"]["message"]
    err = _error(create(tool_choice={"type": "sometimes"}, tools=[WEATHER]))
    assert err.status_code == 400 and "tool_choice" in err.body["error"]["message"]
    err = _error(create(messages=[{"role": "robot", "content": "x"}]))
    assert err.status_code == 400
    err = _error(create(extra_body={"no_such_field": 1}))
    assert err.status_code == 400 and "no_such_field" in err.body["error"]["message"]
    err = _error(create(stop_sequences=["s"] * 40))  # named as this API names it
    assert err.status_code == 400 and "stop_sequences holds 40" in err.body["error"]["message"]
    err = _error(create(max_tokens=1 << 20))
    assert "max_tokens" in err.body["error"]["message"]
    err = _error(create(output_config={"format": {"type": "json_schema", "schema": {}}}))
    assert err.status_code == 400 and "output_config.format" in err.body["error"]["message"]
    err = _error(create(model="not-served"))
    assert err.status_code == 404 and err.body["error"]["type"] == "not_found_error"
    bad = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
    err = _error(create(c=bad))
    assert err.status_code == 401 and err.body["error"]["type"] == "authentication_error"
    err = _error(lambda: bad.messages.count_tokens(model=MODEL, messages=HI))
    assert err.status_code == 401
    err = _error(lambda: client.messages.count_tokens(model=MODEL, messages=[]))
    assert err.status_code == 400
    with httpx.Client(base_url=srv.url) as http:  # no key at all; a body that is not JSON
        r = http.post("/v1/messages", json={"model": MODEL})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = http.post("/v1/messages", content=b"{", headers={"x-api-key": KEY})
        assert r.status_code == 400 and r.json()["type"] == "error"
        r = http.post("/v1/messages", content=b" " * (9 << 20), headers={"x-api-key": KEY})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        assert http.get("/health").status_code == 200


def test_bearer_token_also_authenticates(srv, script):
    script(lambda p: "Ok." if not thinks(p) else None)
    c = anthropic.Anthropic(base_url=srv.url, auth_token=KEY, api_key=None, max_retries=0)
    r = c.messages.create(model=MODEL, max_tokens=8, thinking=NO_THINK, messages=HI)
    assert r.content[0].text == "Ok."
    assert srv.wait_idle()


def test_shutdown_ends_messages_and_responses_streams_with_their_error_event(tmp_path):
    handle = ServerHandle(tmp_path)
    try:
        handle.runner.script = lambda prompt: None  # real sampling: long outputs
        with handle.http() as http, \
                http.stream("POST", "/v1/messages", json={
                    "model": MODEL, "max_tokens": 1000, "messages": HI, "stream": True,
                    "thinking": NO_THINK}) as claude, \
                http.stream("POST", "/v1/responses", json={
                    "model": MODEL, "max_output_tokens": 1000, "input": "Hi", "stream": True,
                    "reasoning": {"effort": "none"}}) as responses:
            claude_lines, responses_lines = claude.iter_lines(), responses.iter_lines()
            next(claude_lines), next(responses_lines)
            handle.llm.begin_shutdown()
            claude_rest = [line for line in claude_lines if line.startswith(("event:", "data:"))]
            responses_rest = [line for line in responses_lines if line.startswith("data:")]
        assert claude_rest[-2] == "event: error"
        error = json.loads(claude_rest[-1][len("data:"):])
        assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
        assert "shutting down" in error["error"]["message"]
        last = json.loads(responses_rest[-1][len("data:"):])
        assert last["type"] == "error" and "shutting down" in last["message"]
    finally:
        handle.stop()


def test_a_repeated_prefix_is_read_from_the_cache(srv, client, script):
    """Anthropic counts a prompt in parts: cache_read_input_tokens come from the prefix cache,
    input_tokens are the rest."""
    script(lambda p: "Noted.</think>Ok." if "Rule 59" in p else None)
    system = " ".join(f"Rule {i}: answer in one short sentence." for i in range(60))
    kw = dict(model=MODEL, max_tokens=16, system=system, messages=HI)
    first = client.messages.create(**kw)
    again = client.messages.create(**kw)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert total > 512 and first.usage.cache_read_input_tokens == 0
    assert again.usage.cache_read_input_tokens == (total - 1) // 256 * 256
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total
