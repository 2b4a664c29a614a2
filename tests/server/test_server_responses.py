"""POST /v1/responses with the official openai client (client.responses.create, stream=True).

Scripted outputs (server_harness) make the model say exact text. Every request's rendered
prompt is compared byte for byte with the chat-completions rendering of the same conversation
(one rendering path); previous_response_id continues a stored conversation.
"""

from __future__ import annotations

import json

import openai
import pytest
from server_harness import (  # noqa: F401 (fixtures)
    MODEL, chat_prompt, client, module_server, script, thinks)

from dsv4.encoding import DSML

D = DSML
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items()
                                                 if k != "type"}}
CALL = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'</{D}invoke>\n</{D}tool_calls>')
OFF = {"effort": "none"}


srv = module_server()


def test_text_with_instructions(srv, client, script):
    script(lambda p: "Greeting.</think>Hello!" if thinks(p) else None)
    r = client.responses.create(model=MODEL, input="Hi", instructions="Be brief.",
                                max_output_tokens=32)
    assert r.status == "completed" and r.id.startswith("resp_")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Greeting." and r.output_text == "Hello!"
    prompt = srv.runner.prompts[-1]
    assert r.usage.input_tokens == len(srv.tokenizer.encode(prompt))
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert prompt == chat_prompt(srv, messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("effort", ["none", "low", "high", "max"])
def test_reasoning_effort_is_mapped_as_in_chat_completions(srv, client, script, effort):
    script(lambda p: "Ok.</think>Yes." if thinks(p) else "Yes.")
    r = client.responses.create(model=MODEL, input="Hi", reasoning={"effort": effort},
                                max_output_tokens=16)
    assert r.output_text == "Yes."
    assert [o.type for o in r.output][:1] == (["message"] if effort == "none" else ["reasoning"])
    assert srv.runner.prompts[-1] == chat_prompt(
        srv, messages=[{"role": "user", "content": "Hi"}], reasoning_effort=effort)


def test_developer_item_is_system_as_in_chat_completions(srv, client, script):
    """deepseek-recipe 0.2.0 turns a Responses developer item into a user turn; dsv4 gives
    developer the OpenAI meaning on every API (workaround in dsv4.server.recipe)."""
    script(lambda p: "Ok." if not thinks(p) else None)
    items = [{"role": "developer", "content": "Answer in French."},
             {"role": "user", "content": "Hi"}]
    client.responses.create(model=MODEL, input=items, reasoning=OFF, max_output_tokens=8)
    assert srv.runner.prompts[-1] == chat_prompt(
        srv, messages=[{"role": "system", "content": "Answer in French."},
                       {"role": "user", "content": "Hi"}], reasoning_effort="none")


def test_hosted_web_search_is_dropped(srv, client, script):
    """Agents declare web_search by default; dsv4 has none, so (as DeepSeek's API) it is left
    out and the rest of the request is served."""
    script(lambda p: "Ok." if not thinks(p) else None)
    r = client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}],
                                reasoning=OFF, max_output_tokens=8)
    assert r.output_text == "Ok."
    assert srv.runner.prompts[-1] == chat_prompt(
        srv, messages=[{"role": "user", "content": "Hi"}], reasoning_effort="none")


def test_forced_function_call(srv, client):
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                tool_choice="required", reasoning=OFF, max_output_tokens=48)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].call_id.startswith("call_")
    args = json.loads(calls[0].arguments)
    assert "city" in args and all(isinstance(v, str) for v in args.values())


def test_function_call_output_round_trip(srv, client, script):
    script(lambda p: "Need it.</think>" + CALL if thinks(p) else None)
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                max_output_tokens=96)
    call = r.output[-1]
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call", "get_weather", {"city": "Paris"})
    script(lambda p: "Done.</think>Sunny." if thinks(p) else None)
    items = [{"role": "user", "content": "Weather in Paris?"},
             *[o.model_dump(exclude_none=True) for o in r.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    r2 = client.responses.create(model=MODEL, input=items, tools=[WEATHER],
                                 max_output_tokens=32)
    assert r2.output_text == "Sunny."
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need it.",
             "tool_calls": [{"id": call.call_id, "type": "function",
                             "function": {"name": "get_weather", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert srv.runner.prompts[-1] == chat_prompt(srv, messages=chat, tools=[CHAT_WEATHER])
    # the same turn through previous_response_id: the stored conversation is continued
    r3 = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER],
                                 max_output_tokens=32, input=[{
                                     "type": "function_call_output", "call_id": call.call_id,
                                     "output": "sunny"}])
    assert r3.output_text == "Sunny." and r3.previous_response_id == r.id
    assert srv.runner.prompts[-1] == chat_prompt(srv, messages=chat, tools=[CHAT_WEATHER])


def test_stream_event_sequence(srv, client, script):
    script(lambda p: "Let me see.</think>Hello there!" if thinks(p) else None)
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True,
                                          max_output_tokens=32))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.reasoning_text.delta",
                 "response.output_text.delta", "response.output_text.done",
                 "response.output_item.done"):
        assert kind in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello there!"
    final = events[-1].response
    assert final.output_text == "Hello there!" and final.usage.output_tokens > 0


def test_stream_function_call_arguments(srv, client, script):
    script(lambda p: CALL if not thinks(p) else None)
    events = list(client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER],
                                          reasoning=OFF, stream=True, max_output_tokens=96))
    args = "".join(e.delta for e in events
                   if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}


def test_sdk_stream_helper_accumulates_every_item(srv, client, script):
    script(lambda p: "Think.</think>Hello!" + CALL if thinks(p) else None)
    with client.responses.stream(model=MODEL, input="Hi", tools=[WEATHER],
                                 max_output_tokens=96) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Hello!" and final.status == "completed"
    assert json.loads(final.output[-1].arguments) == {"city": "Paris"}


def test_incomplete_and_errors(srv, client, script):
    script(lambda p: "one two three four five six" if not thinks(p) else None)
    r = client.responses.create(model=MODEL, input="Hi", reasoning=OFF, max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="Hi", tool_choice={"type": "bogus"},
                                tools=[WEATHER])
    assert info.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", extra_body={"no_such_field": 1})
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object"}}})
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="not-served", input="Hi")
    with pytest.raises(openai.BadRequestError) as info:  # named as this API names it
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=1 << 20)
    assert info.value.body["param"] == "max_output_tokens"
    assert "max_output_tokens" in info.value.body["message"]
    stored = client.responses.create(model=MODEL, input="Hi", reasoning=OFF, store=False,
                                     max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):  # store=False keeps nothing
        client.responses.create(model=MODEL, input="Hi", previous_response_id=stored.id)
    assert srv.http().get("/health").status_code == 200
    assert srv.wait_idle()
