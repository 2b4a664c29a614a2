"""A 10-turn agent conversation against the server, with and without prefix caching.

    python benchmarks/agent_prefix.py [--turns 10] [--device cpu|cuda] [--thinking-chat]

The agent has a system prompt and tool schemas of about 4K tokens. Each turn it asks with
``tool_choice: "required"`` (the model must call a tool; the server's forced call runs as phases
that continue each other's tokens), puts the model's reply into its history as returned
(reasoning, content and the parsed tool call, which the encoder renders back), and answers with
a tool result of a few hundred tokens. The run with caching records every request; the run
without replays the same requests, so both serve identical prompts.

Per turn: time to first token (streamed), prompt tokens, tokens the server reports cached and
the ones it computed, and the most that could be reused: the longest common token prefix of the
turn's prompt with any sequence the engine had already computed (prompt + output of every
earlier engine request), rounded down to whole blocks and short of the prompt's last token (its
logits give the first output token). ``--thinking-chat`` runs a plain multi-turn chat in thinking
mode instead (no tools): there the official encoding drops earlier reasoning, and the table shows
what that leaves to reuse. The model is the embedded demo's architecture with the real
tokenizer and random weights (its words are gibberish; the token counts are real).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from dsv4.async_llm import AsyncLLM
from dsv4.demo import DEMO_CONFIG
from dsv4.engine_args import EngineArgs
from dsv4.model import write_checkpoint
from dsv4.server.app import build_app
from dsv4.tokenizer import Tokenizer

MODEL = "dsv4-bench"
WORDS = ("search index cache block token window request stream parse schema agent tool "
         "result status error retry budget latency memory context prompt answer file path "
         "commit branch merge review test build deploy region quota limit").split()


def words(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 13 + i * i) % len(WORDS)] for i in range(n))


def tools(count: int = 12) -> list[dict[str, Any]]:
    out = []
    for k in range(count):
        props = {f"arg_{j}": {"type": "string", "description": words(12, k * 10 + j)}
                 for j in range(4)}
        out.append({"type": "function", "function": {
            "name": f"tool_{k}", "description": words(60, k),
            "parameters": {"type": "object", "properties": props, "required": ["arg_0"]}}})
    return out


class Recorder:
    """Every engine request's prompt and, once finished, its whole sequence (prompt + output)."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.prompts: list[list[int]] = []
        self.sequences: list[list[int]] = []
        for scheduler in llm.engine.schedulers:
            add, done = scheduler.add_request, scheduler._free_finished

            def add_request(request, add=add):
                self.prompts.append(list(request.prompt_token_ids))
                return add(request)

            def free_finished(request, status, done=done):
                self.sequences.append(list(request.all_token_ids))
                return done(request, status)

            scheduler.add_request = add_request
            scheduler._free_finished = free_finished


def reusable(prompt: list[int], earlier: list[list[int]], block: int) -> tuple[int, int]:
    """(longest common prefix with any earlier sequence, that rounded to what a hit can be)."""
    best = 0
    for seq in earlier:
        n = 0
        for a, b in zip(prompt, seq):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return best, min(best, len(prompt) - 1) // block * block


def serve(llm: AsyncLLM, tokenizer: Tokenizer) -> tuple[uvicorn.Server, str]:
    app = build_app(llm, tokenizer, MODEL, log_requests=False, log_stats=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def ask(http: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any], dict]:
    """Stream one chat completion: (TTFT, the assistant message as returned, usage)."""
    t0 = time.perf_counter()
    ttft = None
    msg: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": ""}
    calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                     "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice["delta"]
                if ttft is None and any(delta.get(k) for k in
                                        ("content", "reasoning_content", "tool_calls")):
                    ttft = time.perf_counter() - t0
                msg["content"] += delta.get("content") or ""
                msg["reasoning_content"] += delta.get("reasoning_content") or ""
                for tc in delta.get("tool_calls") or []:
                    have = calls.setdefault(tc["index"], {"id": tc.get("id"), "type": "function",
                                                          "function": {"name": "",
                                                                       "arguments": ""}})
                    fn = tc.get("function") or {}
                    have["function"]["name"] += fn.get("name") or ""
                    have["function"]["arguments"] += fn.get("arguments") or ""
    if calls:
        msg["tool_calls"] = [calls[i] for i in sorted(calls)]
    return ttft if ttft is not None else time.perf_counter() - t0, msg, usage


class Agent:
    """The conversation: live (each turn's history holds the model's replies), or a replay of
    the request bodies a live run sent."""

    def __init__(self, turns: int, thinking_chat: bool,
                 bodies: list[dict[str, Any]] | None = None) -> None:
        self.turns, self.thinking_chat, self.replay = turns, thinking_chat, bodies
        self.bodies: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": words(1800 if thinking_chat else 900, 1)},
            {"role": "user", "content": "Plan the migration. " + words(40, 2)}]

    def body(self, turn: int) -> dict[str, Any]:
        if self.replay is not None:
            return self.replay[turn]
        body: dict[str, Any] = {"model": MODEL, "messages": list(self.messages),
                                "max_tokens": 48, "temperature": 0}
        if not self.thinking_chat:
            body.update(tools=tools(), tool_choice="required")
        self.bodies.append(body)
        return body

    def reply(self, turn: int, msg: dict[str, Any]) -> None:
        """Put the model's reply and the next user or tool message into the history."""
        self.messages.append(msg)
        if self.thinking_chat:
            self.messages.append({"role": "user", "content": words(150, turn + 3)})
        else:
            call = (msg.get("tool_calls") or [{"id": "call_x"}])[0]
            self.messages.append({"role": "tool", "tool_call_id": call["id"],
                                  "content": json.dumps({"status": "ok",
                                                         "log": words(300, turn)})})


def run(path: Path, args: argparse.Namespace, caching: bool, agent: Agent) -> list[tuple]:
    tokenizer = Tokenizer.from_pretrained(path)
    engine_args = EngineArgs(model=str(path), device=args.device, max_model_len=32768,
                             max_num_seqs=4, kv_cache_memory="2GiB",
                             enable_prefix_caching=caching)
    llm = AsyncLLM(engine_args.create_engine(eos_token_id=tokenizer.eos_token_id))
    block = llm.engine.config.block_size
    recorder = Recorder(llm)
    server, url = serve(llm, tokenizer)
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            ask(http, {"model": MODEL, "max_tokens": 2,  # warm-up, shares nothing
                       "messages": [{"role": "user", "content": "warm up"}]})
            recorder.prompts.clear()
            recorder.sequences.clear()
            for turn in range(agent.turns):
                first = len(recorder.prompts)
                earlier = list(recorder.sequences)
                ttft, msg, usage = ask(http, agent.body(turn))
                agent.reply(turn, msg)
                prompt = recorder.prompts[first]
                lcp, can = reusable(prompt, earlier, block)
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                rows.append((ttft, usage["prompt_tokens"], cached, usage["prompt_tokens"] - cached,
                             lcp, can))
    finally:
        server.should_exit = True
        llm.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--thinking-chat", action="store_true",
                    help="a multi-turn chat in thinking mode, no tools")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", DEMO_CONFIG, seed=0)
        live = Agent(args.turns, args.thinking_chat)
        warm = run(path, args, True, live)
        cold = run(path, args, False, Agent(args.turns, args.thinking_chat, live.bodies))
    print("turn | prompt | cached | computed | reusable (LCP, whole blocks) | hit % of reusable "
          "| TTFT cached s | TTFT uncached s | speed-up")
    for k, ((ttft, prompt, cached, computed, lcp, can), row) in enumerate(zip(warm, cold), 1):
        rate = f"{100 * cached / can:.0f}%" if can else "-"
        print(f"{k} | {prompt} | {cached} | {computed} | {lcp} ({can}) | {rate} | {ttft:.3f} | "
              f"{row[0]:.3f} | {row[0] / ttft:.1f}x")
    later = warm[1:]
    total = sum(r[5] for r in later)
    print(f"turns 2..{len(warm)}: {sum(r[2] for r in later)} of {total} reusable tokens hit "
          f"({100 * sum(r[2] for r in later) / max(total, 1):.1f}%); computed / (new + block "
          f"rounding) worst {max(r[3] / max(r[1] - r[5], 1) for r in later):.2f}x; TTFT of turn "
          f"{len(warm)}: {cold[-1][0] / warm[-1][0]:.1f}x lower with caching")


if __name__ == "__main__":
    main()
