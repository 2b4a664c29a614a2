"""A server started with --speculative-config: completions plain and streamed give the tokens
the engine gives without speculation, a forced tool call (a grammar row, verified position by
position under its masks) completes beside them, and /metrics counts drafted and accepted
tokens."""

from __future__ import annotations

import re

from server_harness import ENGINE_ARGS, MODEL, module_server

from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine_args import EngineArgs
from dsv4.sampling_params import SamplingParams

# fp64 (the exact mode): a verify row and a plain decode attend by different paths, and only
# there do they give the same logits to the last bit (docs/architecture.md, numerics)
srv = module_server(speculative_config={"method": "mtp", "num_speculative_tokens": 2},
                    dtype="float64")
PROMPT = [9, 812, 77, 1500, 23, 4096, 311, 58, 2048, 65, 1024, 99]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def plain_tokens(srv, prompt: list[int], max_tokens: int) -> list[int]:
    """What an engine without speculation gives on the server's model (run on the engine's
    thread, between its steps)."""
    def run(engine: LLMEngine) -> list[int]:
        model = engine.model
        args = EngineArgs(**ENGINE_ARGS, dtype="float64")
        eng = LLMEngine(model, args.create_engine_config(model), srv.tokenizer.eos_token_id)
        eng.add_request("ref", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                      ignore_eos=True))
        out: list[int] = []
        while eng.has_unfinished_requests():
            for o in eng.step():
                out += o.new_token_ids
        return out

    return srv.engine_call(run)


def test_completions_match_the_engine_without_speculation(srv):
    want = plain_tokens(srv, PROMPT, 24)

    def right(request_id, so_far, proposed):  # the drafts the target accepts: most steps
        done = len(so_far) - len(PROMPT)      # verify three tokens
        return (want[done:done + len(proposed)] + [0] * len(proposed))[:len(proposed)]

    srv.engine_call(lambda e: setattr(e.runner, "draft_override", right))
    try:
        client = srv.client()
        text = srv.tokenizer.decode(want, skip_special_tokens=True)
        body = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                    extra_body={"ignore_eos": True})
        assert client.completions.create(**body).choices[0].text == text
        chunks = list(client.completions.create(**body, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        # a stop string completed by an accepted draft: the text and the token count end
        # where they end without speculation
        stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 3)
                    if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
        n = next(n for n in range(1, 25)
                 if stop in srv.tokenizer.decode(want[:n], skip_special_tokens=True))
        r = client.completions.create(**body, stop=[stop])
        assert r.choices[0].text == text[:text.find(stop)]
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == n
    finally:
        srv.engine_call(lambda e: setattr(e.runner, "draft_override", None))
    metrics = srv.http().get("/metrics").text
    drafted = re.search(r'^dsv4:spec_decode_num_draft_tokens_total\{[^}]*\} (\S+)', metrics,
                        re.M)
    accepted = re.search(r'^dsv4:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)', metrics,
                         re.M)
    assert drafted and accepted
    assert 0 < float(accepted.group(1)) <= float(drafted.group(1))
    assert 'dsv4:spec_decode_num_accepted_tokens_per_pos_total{model_name="dsv4-test",' \
           'position="1"}' in metrics


def test_a_forced_tool_call_runs_beside_speculating_rows(srv):
    """A tool call under the DSML grammar and a plain completion share the steps, both with
    drafts: the completion still gives the engine's tokens without speculation, the call
    follows its grammar."""
    from concurrent.futures import ThreadPoolExecutor

    want = srv.tokenizer.decode(plain_tokens(srv, PROMPT, 40), skip_special_tokens=True)
    client = srv.client()
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(
            client.chat.completions.create, model=MODEL,
            messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
            tool_choice="required", max_tokens=60,
            extra_body={"chat_template_kwargs": {"thinking": False}})
        text = pool.submit(client.completions.create, model=MODEL, prompt=PROMPT,
                           max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        call, text = call.result(), text.result()
    assert text.choices[0].text == want
    choice = call.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:  # the random model's argument ran past max_tokens: still inside the call block
        assert not choice.message.content
