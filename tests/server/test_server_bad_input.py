"""Bad input through the real HTTP server: every answer is a 4xx (or 500) in OpenAI's shape that
names the field, and the server goes on serving. Covers fan-out and size caps (n, prompts x n,
stop, stop_token_ids, logit_bias, messages, tools, JSON depth, body size), messages without
content, lone surrogates on every endpoint, tool definitions and tool-call history, and the
error shape of unknown routes, wrong methods, non-JSON bodies and unexpected exceptions.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from server_harness import module_server  # noqa: F401 (fixtures)

from dsv4.server import validation

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "21C"}


srv = module_server()


@pytest.fixture
def http(srv):
    with srv.http() as client:
        yield client


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _chat(http, **body):
    body.setdefault("messages", USER)
    body.setdefault("max_tokens", 1)
    return http.post("/v1/chat/completions", json=body)


def _completion(http, **body):
    body.setdefault("prompt", "hi")
    body.setdefault("max_tokens", 1)
    return http.post("/v1/completions", json=body)


def _still_serving(http):
    assert http.get("/health").status_code == 200
    r = _chat(http)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


# ---- 1. fan-out and size caps -----------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    (dict(n=1_000_000), "n"),  # used to take the whole server down
    (dict(n=129), "n"),
    (dict(stop=[f"s{i}" for i in range(33)]), "stop"),
    (dict(stop="x" * 257), "stop"),
    (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
    (dict(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
    (dict(top_k=2**63), "top_k"),  # failed an engine step (int64 overflow): a 500
    (dict(seed=-2**63 - 1), "seed"),
    (dict(messages=USER * (validation.MAX_MESSAGES + 1)), "messages"),
    (dict(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
     "tools"),
])
def test_chat_caps(http, body, param):
    err = _error(_chat(http, **body))
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["code"] is None  # a cap, not the context length


@pytest.mark.parametrize("body, param", [
    (dict(n=129), "n"),
    (dict(n=1, best_of=1000), "best_of"),
    (dict(prompt=["a"] * 129), "prompt"),
    (dict(prompt=["a", "b"], n=65), "n"),  # 130 choices
    (dict(prompt=[[1]] * 64, n=3), "n"),
    (dict(prompt=[7] * 1_000_000), "prompt"),  # a million ids: over the context, at once
    (dict(stop=["x"] * 33), "stop"),
])
def test_completion_caps(http, body, param):
    err = _error(_completion(http, **body))
    assert err["param"] == param


def test_caps_admit_their_limit(http):
    r = _completion(http, prompt=["a", "b"], n=64, temperature=0)
    assert r.status_code == 200 and len(r.json()["choices"]) == validation.MAX_CHOICES
    r = _chat(http, stop=["x" * 256] * 32, stop_token_ids=list(range(1024)),
              logit_bias={str(i): 1 for i in range(300)}, top_k=2**63 - 1)
    assert r.status_code == 200
    _still_serving(http)


def test_json_nesting_and_body_size(srv, http):
    deep = {"type": "object"}
    for _ in range(80):
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    assert _error(_chat(http, tools=tools))["param"] == "tools"
    for n in (100, 100_000):  # beyond the JSON parser's own recursion limit too
        raw = b'{"messages": ' + b"[" * n + b"]" * n + b"}"
        for path in ("/v1/chat/completions", "/tokenize"):
            r = http.post(path, content=raw)
            assert _error(r)["param"] in ("messages", None)
    limit = validation.body_limit(srv.llm.engine.config.max_model_len)
    big = b'{"prompt": "' + b"a" * limit + b'"}'
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert _error(http.post(path, content=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds while reading
        yield b'{"prompt": "'
        for _ in range(limit // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    assert _error(http.post("/tokenize", content=chunks()), 413)["code"] == "request_too_large"
    _still_serving(http)


# ---- 2. messages without content --------------------------------------------------------------

@pytest.mark.parametrize("messages, param", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "system"}, *USER], "messages[0].content"),
    ([*USER, {"role": "assistant"}], "messages[1].content"),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": []}], "messages[1].content"),
    ([*USER, ASSISTANT_CALL, {"role": "tool", "tool_call_id": "call_1"}], "messages[2].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
])
def test_message_content_is_required(http, messages, param):
    for r in (_chat(http, messages=messages), http.post("/tokenize", json={"messages": messages})):
        assert _error(r)["param"] == param


def test_assistant_tool_calls_may_omit_content(http):
    messages = [*USER, ASSISTANT_CALL, RESULT]
    r = _chat(http, messages=messages, tools=[TOOL])
    assert r.status_code == 200, r.text
    prompt = http.post("/tokenize", json={"messages": messages, "tools": [TOOL]}).json()["prompt"]
    assert "<tool_result>21C</tool_result>" in prompt
    assert 'name="city" string="true">Paris<' in prompt


# ---- 3. lone surrogates -----------------------------------------------------------------------

_S = '"\\ud800"'  # valid JSON, not valid Unicode


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}' % _S,
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
     '"text": %s}]}]}' % _S, "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": '
     '[{"type": "function", "function": {"name": "f", "description": %s}}]}' % _S,
     "tools[0].function.description"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": [%s]}'
     % _S, "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": '
     '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", '
     '"properties": {"\\udc00": {}}}}}]}', "tools[0].function.parameters.properties"),
    ("/v1/completions", '{"prompt": %s}' % _S, "prompt"),
    ("/v1/completions", '{"prompt": ["ok", %s]}' % _S, "prompt[1]"),
    ("/v1/completions", '{"prompt": "hi", "stop": %s}' % _S, "stop"),
    ("/tokenize", '{"prompt": %s}' % _S, "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": %s}]}' % _S, "messages[0].content"),
    ("/detokenize", '{"tokens": [1], "model": %s}' % _S, "model"),
])
def test_lone_surrogates_are_400_naming_the_field(http, path, raw, param):
    err = _error(http.post(path, content=raw.encode()))
    assert err["param"] == param and "surrogate" in err["message"]


def test_surrogate_escaped_inside_tool_call_arguments(http):
    call = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "\\ud800"}'}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, RESULT]
    err = _error(_chat(http, messages=messages, tools=[TOOL]))
    assert err["param"] == "messages[1].tool_calls[0].function.arguments.city"


# ---- 4. tools and tool-call history -----------------------------------------------------------

def _tool(**function):
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize("tools, param", [
    ([_tool(parameters="object")], "tools[0].function.parameters"),
    ([_tool(parameters=[1])], "tools[0].function.parameters"),
    ([_tool(parameters={"type": "string"})], "tools[0].function.parameters"),
    ([_tool(), _tool()], "tools[1].function.name"),
    ([_tool(name='a" b')], "tools[0].function.name"),
    ([_tool(name="x" * 65)], "tools[0].function.name"),
    ([_tool(description=3)], "tools[0].function.description"),
    ([{"type": "function"}], "tools[0]"),
])
def test_bad_tools(http, tools, param):
    for r in (_chat(http, tools=tools),
              http.post("/tokenize", json={"messages": USER, "tools": tools})):
        assert _error(r)["param"] == param


def _call(**function):
    return {**CALL, "function": {**CALL["function"], **function}}


@pytest.mark.parametrize("messages, param", [
    ([*USER, RESULT], "messages[1].role"),  # no assistant tool call before it
    ([*USER, {"role": "assistant", "content": "no calls"}, RESULT], "messages[2].role"),
    ([*USER, ASSISTANT_CALL, USER[0], RESULT], "messages[3].role"),
    ([*USER, ASSISTANT_CALL, {"role": "tool", "content": "21C"}], "messages[2].tool_call_id"),
    ([*USER, ASSISTANT_CALL, {**RESULT, "tool_call_id": "call_2"}], "messages[2].tool_call_id"),
    ([*USER, {"role": "assistant", "tool_calls": [_call(arguments="city=Paris")]}, RESULT],
     "messages[1].tool_calls[0].function.arguments"),
    ([*USER, {"role": "assistant", "tool_calls": [_call(arguments="[1, 2]")]}, RESULT],
     "messages[1].tool_calls[0].function.arguments"),
    ([*USER, {"role": "assistant", "tool_calls": [_call(arguments=None)]}, RESULT],
     "messages[1].tool_calls[0].function.arguments"),
    ([*USER, {"role": "assistant", "tool_calls": [{**CALL, "id": None}]}, RESULT],
     "messages[1].tool_calls[0].id"),
    ([*USER, {"role": "assistant", "tool_calls": [_call(name="")]}, RESULT],
     "messages[1].tool_calls[0].function.name"),
    ([*USER, {"role": "assistant", "tool_calls": {"id": "x"}}], "messages[1].tool_calls"),
])
def test_bad_tool_history(http, messages, param):
    for r in (_chat(http, messages=messages, tools=[TOOL]),
              http.post("/tokenize", json={"messages": messages, "tools": [TOOL]})):
        assert _error(r)["param"] == param


def test_parallel_tool_results_and_object_arguments(http):
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather",
                                                   "arguments": {"city": "Rome"}}}
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [CALL, second]},
                {**RESULT, "tool_call_id": "call_2"}, RESULT, {"role": "user", "content": "?"}]
    r = http.post("/tokenize", json={"messages": messages, "tools": [TOOL]})
    assert r.status_code == 200, r.text
    assert 'string="true">Rome<' in r.json()["prompt"]


# ---- 5. the error shape everywhere ------------------------------------------------------------

def test_routes_methods_and_bodies_are_openai_shaped(http):
    for method, path in (("GET", "/no/such/route"), ("POST", "/v1/chat/completion"),
                         ("DELETE", "/v1/models/x")):
        err = _error(http.request(method, path), 404)
        assert err["message"] == f"Invalid URL ({method} {path})"
    for method, path in (("GET", "/v1/chat/completions"), ("PUT", "/tokenize"),
                         ("POST", "/v1/models")):
        r = http.request(method, path)
        assert "method not allowed" in _error(r, 405)["message"].lower()
        assert r.headers["allow"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        for raw in (b"", b"{bad", b'"a string"', b"[1]", b"\xff"):
            assert _error(http.post(path, content=raw))["code"] == "invalid_json"


def test_unexpected_exceptions_are_a_logged_json_500(srv, http, monkeypatch, caplog):
    def explode(*_args, **_kw):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(srv.tokenizer, "encode", explode)
    monkeypatch.setattr(srv.tokenizer, "decode", explode)
    with caplog.at_level(logging.ERROR):
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            err = _error(http.post(path, json=body), 500)
            assert err["type"] == "server_error" and "tokenizer exploded" in err["message"]
    logged = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
    assert [r.getMessage() for r in logged] == ["POST /tokenize failed", "POST /detokenize failed"]
    monkeypatch.undo()
    _still_serving(http)
