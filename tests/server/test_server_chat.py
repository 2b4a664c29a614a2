"""Chat completions end to end with the official openai client against a server on loopback.

Scripted outputs (see server_harness) make the model "say" exact text, so reasoning, content and
DSML tool calls travel through the real detokenizer and output parser: thinking and chat mode
splits, a full tool-call round trip (plain and streamed), tool_choice none, stop strings, n /
seed / logprobs. Forced and strict tool calls are grammar-made: test_server_structured.
"""

from __future__ import annotations

import json

import openai
import pytest
from server_harness import MODEL, client, module_server, script  # noqa: F401 (fixtures)

from dsv4.encoding import ASSISTANT, DSML, EOS, THINK_CLOSE, THINK_OPEN

D = DSML
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}
CALL = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
        f'</{D}invoke>\n</{D}tool_calls>')
NO_THINK = {"thinking": {"type": "disabled"}}


srv = module_server()


def ask(client, text, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                  "content": text}], **kw)


def test_thinking_mode_splits_reasoning_and_content(srv, client, script):
    script(lambda p: "The user greets me.</think>Hello! How can I help?" if "[greet]" in p
           else None)
    r = ask(client, "[greet] hi")
    assert srv.runner.prompts[-1].endswith(ASSISTANT + THINK_OPEN)  # thinking is the default
    msg = r.choices[0].message
    assert msg.reasoning_content == "The user greets me."
    assert msg.content == "Hello! How can I help?"
    assert msg.tool_calls is None and r.choices[0].finish_reason == "stop"
    tok = srv.tokenizer
    assert r.usage.completion_tokens == len(tok.encode("The user greets me.</think>Hello! How "
                                                       "can I help?")) + 1  # + EOS
    assert r.usage.completion_tokens_details.reasoning_tokens == len(
        tok.encode("The user greets me."))
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.prompt_tokens == len(tok.encode(srv.runner.prompts[-1]))
    assert srv.wait_idle()


@pytest.mark.parametrize("spelling", [
    dict(extra_body=NO_THINK),
    dict(extra_body={"chat_template_kwargs": {"thinking": False}}),
    dict(reasoning_effort="none"),
])
def test_chat_mode_spellings(srv, client, script, spelling):
    script(lambda p: "Plain answer." if p.endswith(ASSISTANT + THINK_CLOSE) else "wrong")
    r = ask(client, "[chat] hi", **spelling)
    msg = r.choices[0].message
    assert msg.content == "Plain answer." and msg.reasoning_content is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_reasoning_effort_spellings(srv, client, script):
    script(lambda p: "ok</think>done")
    ask(client, "[effort]", reasoning_effort="max")
    assert "Reasoning Effort: Absolute maximum" in srv.runner.prompts[-1]
    ask(client, "[effort]", extra_body={"chat_template_kwargs": {"reasoning_effort": "xhigh"}})
    assert "Reasoning Effort: Absolute maximum" in srv.runner.prompts[-1]
    ask(client, "[effort]", extra_body={"reasoning": {"effort": "high"}})
    assert "Reasoning Effort" not in srv.runner.prompts[-1]
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "[effort]", reasoning_effort="turbo")
    assert err.value.body["param"] == "reasoning_effort"


def test_streaming_reasoning_then_content_with_usage(srv, client, script):
    text = "Step one. Step two.</think>The answer is 42."
    script(lambda p: text if "[stream]" in p else None)
    chunks = list(ask(client, "[stream] q", stream=True,
                      stream_options={"include_usage": True}))
    kinds, reasoning, content = [], "", ""
    for ch in chunks[:-1]:
        assert ch.usage is None
        delta = ch.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            kinds.append("r")
            reasoning += delta.reasoning_content
        if delta.content:
            kinds.append("c")
            content += delta.content
    assert reasoning == "Step one. Step two." and content == "The answer is 42."
    assert kinds == sorted(kinds, reverse=True)  # every reasoning delta before any content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        srv.tokenizer.encode(text)) + 1
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == len(
        srv.tokenizer.encode("Step one. Step two."))


def _weather_script(p):
    if "[weather]" not in p:
        return None
    if "<tool_result>" in p:
        return "Got it.</think>It is 21°C and sunny in Paris."
    return "I need the weather.</think>" + CALL


def test_tool_call_round_trip(srv, client, script):
    script(_weather_script)
    messages = [{"role": "user", "content": "[weather] How warm is Paris?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "I need the weather."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris", "days": 3}'
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'})
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r2.choices[0].message.content == "It is 21°C and sunny in Paris."
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.tool_calls is None
    prompt = srv.runner.prompts[-1]
    assert "I need the weather.</think>" + CALL + EOS in prompt  # reasoning kept for tools
    assert prompt.endswith('<tool_result>{"temp": 21}</tool_result>' + ASSISTANT + THINK_OPEN)


def test_tool_call_streaming(srv, client, script):
    script(_weather_script)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[weather] Paris?"}],
        tools=[WEATHER], stream=True)
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            if tc.function.name:
                entry["name"] += tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and DSML not in content
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}


def test_tool_choice_none_and_no_tools_never_report_calls(client, script):
    script(lambda p: "Let me call.</think>Sure." + CALL if "[none]" in p else None)
    for kw in (dict(tools=[WEATHER], tool_choice="none"), {}):
        r = ask(client, "[none] Paris?", **kw)
        msg = r.choices[0].message
        assert msg.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert msg.content == "Sure." and DSML not in msg.content


def test_stop_strings_and_engine_release(srv, client, script):
    script(lambda p: "abc STOP def ghi jkl" if "[stop]" in p else None)
    r = ask(client, "[stop]", stop=["STOP"], extra_body=NO_THINK)
    assert r.choices[0].message.content == "abc " and r.choices[0].finish_reason == "stop"
    chunks = list(ask(client, "[stop]", stop="STOP", extra_body=NO_THINK, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abc "
    assert srv.wait_idle()


def test_n_seed_and_logprobs(client):
    kw = dict(n=2, seed=7, max_tokens=5, logprobs=True, top_logprobs=2, temperature=1.0,
              extra_body=NO_THINK)
    a, b = ask(client, "random text", **kw), ask(client, "random text", **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for choice in a.choices:
        assert choice.finish_reason == "length"
        assert len(choice.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    assert a.usage.completion_tokens == 10


def test_damaged_values_are_repaired_by_the_declared_schema(client, script):
    bad = CALL.replace('string="true">Paris', 'string="false">Paris').replace(">3<", "> +3<")
    script(lambda p: bad if "[badjson]" in p else None)
    r = ask(client, "[badjson] Paris?", tools=[WEATHER], extra_body=NO_THINK)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.arguments == '{"city": "Paris", "days": 3}'  # by the schema's types
    stream = ask(client, "[badjson] Paris?", tools=[WEATHER], extra_body=NO_THINK, stream=True)
    args = "".join(tc.function.arguments or "" for chunk in stream
                   for tc in chunk.choices[0].delta.tool_calls or [])
    assert args == '{"city": "Paris", "days": 3}'
