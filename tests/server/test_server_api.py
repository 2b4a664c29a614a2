"""The rest of the API on loopback (server with an API key): completions, models, health,
metrics, tokenize/detokenize, every error shape, client disconnects freeing the cache, failure
isolation, and `dsv4 serve` itself as a subprocess (URL printed, SIGINT exits 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from server_harness import MODEL, ServerHandle, checkpoint

from dsv4.server import launch
from dsv4.server.parsers import DSV4OutputParser

KEY = "sk-test-key"
NO_THINK = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # fp64, the exact mode: test_completions compares a prompt's logprob with the same token
    # generated, and a batch with a request alone; in fp32 with the QAT rounding on a 1-ulp
    # difference between batch shapes can flip an FP8 rounding (docs/architecture.md)
    handle = ServerHandle(tmp_path_factory.getbasetemp(), api_key=KEY, dtype=torch.float64)
    yield handle
    handle.stop()


@pytest.fixture
def client(srv):
    return srv.client()


def chat(client, text="hi", **kw):
    kw.setdefault("model", MODEL)
    return client.chat.completions.create(messages=[{"role": "user", "content": text}], **kw)


def test_models_health_metrics(srv, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with httpx.Client(base_url=srv.url) as anonymous:  # no key needed for these two
        assert anonymous.get("/health").status_code == 200
        chat(client, max_tokens=2)
        text = anonymous.get("/metrics").text
    for name in ("dsv4:requests_total", "dsv4:request_success_total",
                 "dsv4:time_to_first_token_seconds_bucket", "dsv4:inter_token_latency_seconds",
                 "dsv4:e2e_request_latency_seconds", "dsv4:num_requests_running",
                 "dsv4:num_requests_waiting", "dsv4:kv_cache_usage_perc",
                 "dsv4:prompt_tokens_total", "dsv4:generation_tokens_total"):
        assert name in text
    assert 'outcome="success"' in text


def test_completions(srv, client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2,
                                  temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 4
    assert len(choice.logprobs.tokens) == 4 and "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    echo = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "Hello" + choice.text
    # echo + logprobs (lm-eval's loglikelihood call): the prompt's tokens lead, the first
    # without a logprob, each later one scored given the tokens before it
    prompt_ids = srv.tokenizer.encode("Hello there, world")
    scored = client.completions.create(model=MODEL, prompt="Hello there, world", max_tokens=1,
                                       temperature=0, echo=True, logprobs=1).choices[0].logprobs
    assert len(scored.tokens) == len(prompt_ids) + 1 and scored.token_logprobs[0] is None
    assert scored.top_logprobs[0] is None and all(len(t) == 1 for t in scored.top_logprobs[1:])
    assert all(lp <= 0 for lp in scored.token_logprobs[1:])
    assert scored.text_offset[0] == 0 and scored.text_offset == sorted(scored.text_offset)
    # the same value as generating that token after the first (forced by logit_bias, which
    # leaves the reported logprobs raw)
    forced = client.completions.create(model=MODEL, prompt=prompt_ids[:1], max_tokens=1,
                                       temperature=0, logprobs=1,
                                       logit_bias={str(prompt_ids[1]): 100}).choices[0].logprobs
    assert forced.token_logprobs[0] == pytest.approx(scored.token_logprobs[1], abs=1e-4)
    ids = srv.tokenizer.encode("Hello")
    batch = client.completions.create(model=MODEL, prompt=[ids, "Hello"], max_tokens=4, n=2,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {choice.text}
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 4


def test_logit_bias_and_min_tokens(srv, client):
    token = srv.tokenizer.encode(" the")[0]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == " the" * 3
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                  logit_bias={str(token): 100},
                                  extra_body={"min_tokens": 2, "stop_token_ids": [token]})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "stop"


def test_tokenize_detokenize(srv):
    with srv.http() as http:
        r = http.post("/tokenize", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}], "thinking": {"type": "disabled"}}).json()
        assert r["prompt"].endswith("<｜User｜>hi<｜Assistant｜></think>")
        assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
        back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
        assert back["prompt"] == r["prompt"]
        assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


@pytest.mark.parametrize("kw, param", [
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=100_000), "max_tokens"),
    (dict(logit_bias={"five": 1.0}), "logit_bias"),
    (dict(logit_bias={"\u00b2": 1.0}), "logit_bias"),  # a digit to str.isdigit, not to int()
    (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"999999999": 1.0}), "logit_bias"),
    (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(tools=[{"type": "function"}]), "tools[0]"),
    (dict(top_logprobs=3), "top_logprobs"),
])
def test_bad_fields_are_400_naming_them(client, kw, param):
    status, body = _error(lambda: chat(client, **kw))
    assert status == 400 and body["param"] == param and body["type"] == "invalid_request_error"


def test_other_errors(srv, client):
    status, body = _error(lambda: chat(client, "word " * 3000, max_tokens=1))
    assert status == 400 and body["code"] == "context_length_exceeded"
    status, body = _error(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "wizard", "content": "x"}]))
    assert status == 400 and body["param"] == "messages[0].role"
    status, body = _error(lambda: chat(client, model="gpt-9"))
    assert status == 404 and body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").models.list()
    with httpx.Client(base_url=srv.url) as anonymous:
        r = anonymous.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with srv.http() as http:
        for body_bytes in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            r = http.post("/v1/chat/completions", content=body_bytes,
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert http.get("/no/such/route").json()["error"]["type"] == "invalid_request_error"
    assert chat(client, max_tokens=1).choices[0].finish_reason == "length"  # still serving


def test_engine_rejection_is_a_400(srv, client, monkeypatch):
    monkeypatch.setattr(srv.llm.engine.block_manager, "can_fit", lambda *a: False)
    for stream in (False, True):
        status, body = _error(lambda s=stream: chat(client, max_tokens=4, stream=s))
        assert status == 400 and "never fit the KV cache" in body["message"]
    monkeypatch.undo()
    assert chat(client, max_tokens=1).usage.completion_tokens == 1


def test_disconnect_mid_stream_frees_the_cache(srv):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "stream": True,
            "max_tokens": 1000, "ignore_eos": True}
    with srv.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert srv.engine_call(lambda e: e.scheduler.num_running) == 1
    assert srv.wait_idle(), "the aborted request still holds cache blocks"
    with srv.http() as http, pytest.raises(httpx.ReadTimeout):  # a client that gives up
        http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert srv.wait_idle(), "the abandoned request still holds cache blocks"
    assert 'outcome="aborted"' in httpx.get(srv.url + "/metrics").text


def test_one_failing_request_does_not_affect_others(srv, monkeypatch):
    real_feed = DSV4OutputParser.feed

    def feed(self, text):
        if "BOOM" in self.content + text:
            raise RuntimeError("parser exploded")
        return real_feed(self, text)

    monkeypatch.setattr(DSV4OutputParser, "feed", feed)
    srv.runner.script = lambda p: "BOOM" if "[boom]" in p else None
    aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)

    async def good():
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "fine"}], stream=True,
            max_tokens=30, extra_body={**NO_THINK, "ignore_eos": True})
        return [c async for c in stream]

    async def bad():
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "[boom]"}], extra_body=NO_THINK)

    async def main():
        return await asyncio.gather(good(), bad(), return_exceptions=True)

    try:
        chunks, failed = asyncio.run(main())
    finally:
        srv.runner.script = None
    assert isinstance(failed, openai.InternalServerError)
    assert failed.body["type"] == "server_error"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert srv.wait_idle()


def test_serve_command_prints_url_and_exits_cleanly_on_sigint(tmp_path_factory):
    path = checkpoint(tmp_path_factory.getbasetemp())
    code = "import sys; from dsv4.server.launch import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "DSV4_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), "--port", "0", "--device", "cpu",
         "--max-model-len", "1024", "--kv-cache-memory", "64MiB", "--served-model-name", "m",
         "--log-level", "warning", "--dtype", "float64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "ready at http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split("ready at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=2)
        assert r.usage.completion_tokens == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_launch_helpers(tmp_path):
    from dsv4.demo import resolve_model
    from dsv4.engine_args import parse_bytes

    assert parse_bytes("8GiB") == 8 << 30 and parse_bytes("1e9") == 10**9
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        resolve_model("no-such-org-zz/no-such-model-zz")
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        resolve_model("not a model")
    start = time.monotonic()
    assert launch.build_parser().parse_args([]).port == 8000
    assert launch.build_parser().parse_args([]).dtype == "auto"
    assert time.monotonic() - start < 1
