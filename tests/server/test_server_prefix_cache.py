"""Prefix caching as clients see it: an agent conversation with tools through the openai client
reports the reused prompt tokens in usage (plain and streamed), completions too, /metrics counts
queries and hits, and a forced tool call prefills its prompt once.

The scripted runner (server_harness) makes the model say exact DSML, so each turn's prompt
renders the previous turns as an agent's history really looks. Cache blocks are 256 tokens;
the system prompt makes the conversation long enough to fill several.
"""

from __future__ import annotations

import re

from server_harness import MODEL, module_server, script  # noqa: F401 (fixtures)

from dsv4.encoding import DSML

D = DSML
BLOCK = 256
SYSTEM = "You are a careful travel agent. " + " ".join(
    f"Rule {i}: check weather source number {i} twice before you answer." for i in range(70))
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def call(city: str) -> str:
    return (f'Looking up {city}.</think>\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
            f'<{D}parameter name="city" string="true">{city}</{D}parameter>\n'
            f'</{D}invoke>\n</{D}tool_calls>')


srv = module_server()


def engine_hits(srv) -> tuple[int, int]:
    stats = srv.engine_call(lambda e: e.stats())
    return stats.prefix_cache_queries, stats.prefix_cache_hits


def test_agent_turns_report_cached_tokens(srv, script):
    client = srv.client()
    answers = [call("Paris"), call("Rome"), call("Oslo"), "All three are mild.</think>Mild."]
    script(lambda prompt: answers.pop(0) if "travel agent" in prompt and answers else None)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Compare the weather in three cities."}]
    prompts, cached = [], []
    for turn in range(4):
        stream = turn == 2
        r = client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=120, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(r)
            usage = chunks[-1].usage
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                                for c in chunks if c.choices)
            tool_calls = [{"id": calls[0].id, "type": "function", "function": {
                "name": calls[0].function.name,
                "arguments": "".join(tc.function.arguments or "" for tc in calls)}}]
        else:
            usage, msg = r.usage, r.choices[0].message
            reasoning = getattr(msg, "reasoning_content", None) or ""
            tool_calls = [tc.model_dump() for tc in msg.tool_calls or []]
        prompts.append(usage.prompt_tokens)
        cached.append(usage.prompt_tokens_details.cached_tokens)
        assert usage.prompt_cache_hit_tokens == cached[-1]  # DeepSeek's names agree
        assert usage.prompt_cache_miss_tokens == usage.prompt_tokens - cached[-1]
        if not tool_calls:
            break
        messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning,
                         "tool_calls": tool_calls})
        messages.append({"role": "tool", "tool_call_id": tool_calls[0]["id"],
                         "content": '{"temp_c": 21, "sky": "clear"}'})
    assert len(prompts) == 4 and prompts[0] > 3 * BLOCK
    assert cached[0] == 0
    for turn in range(1, 4):
        # with tools the encoding keeps the reasoning: the previous prompt is a prefix
        assert cached[turn] % BLOCK == 0
        assert prompts[turn - 1] // BLOCK * BLOCK <= cached[turn] < prompts[turn]
    metrics = srv.http().get("/metrics").text
    hits = re.search(r'^dsv4:prefix_cache_hits_total\{[^}]*\} (\S+)$', metrics, re.M)
    queries = re.search(r'^dsv4:prefix_cache_queries_total\{[^}]*\} (\S+)$', metrics, re.M)
    assert hits and queries and float(hits[1]) >= sum(cached) and float(queries[1]) > 0
    assert srv.wait_idle()


def test_completions_report_cached_tokens(srv):
    client = srv.client()
    prompt = SYSTEM + " Now summarise the rules."
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 2 * BLOCK
    assert again.usage.prompt_tokens_details.cached_tokens == \
        (again.usage.prompt_tokens - 1) // BLOCK * BLOCK
    salted = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                       extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # vLLM's cache_salt


def test_a_forced_tool_call_prefills_its_prompt_once(srv, script):
    """tool_choice "required" is one engine request under the tool-call grammar: its prompt is
    looked up and computed once (the phases it replaced re-prefilled, hitting the cache)."""
    script(None)
    client = srv.client()
    before = len(srv.runner.prompts)
    queries0, _ = engine_hits(srv)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief. " + SYSTEM},
                               {"role": "user", "content": "Weather in Lima?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=60,
        extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.tool_calls
    queries1, _ = engine_hits(srv)
    assert len(srv.runner.prompts) - before == 1  # one engine request
    assert queries1 - queries0 == r.usage.prompt_tokens
    assert srv.wait_idle()
