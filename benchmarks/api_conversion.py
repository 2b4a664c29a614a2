"""What the Messages API adds before a prompt exists: deepseek-recipe's request conversion and
``to_chat``, beside the encoder's rendering of the same conversation.

    python benchmarks/api_conversion.py [--turns 50] [--repeat 20]

The conversation is agent-shaped: per turn a user message, an assistant text + tool_use, and a
tool_result (about 1.4K characters per turn). Prints the best of ``--repeat`` runs of each step.
"""

from __future__ import annotations

import argparse
import time
import types
from collections.abc import Callable

import deepseek_recipe as dr

from dsv4.encoding import encode_messages
from dsv4.server.recipe import convert, to_chat

BASH = {"name": "Bash", "description": "Run a command", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}


def body(turns: int) -> dict:
    msgs: list[dict] = []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"step {i} " + "lorem ipsum " * 40})
        msgs.append({"role": "assistant", "content": [
            {"type": "text", "text": "ok " * 50},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "Bash",
             "input": {"command": "ls -la"}}]})
        msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "file " * 100}]})
    return {"messages": msgs, "system": "You are an agent.", "tools": [BASH]}


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    state = types.SimpleNamespace(max_model_len=1 << 20, default_thinking=True,
                                  model_names=["m"])
    request = body(args.turns)
    conversation = convert(state, dr.MessagesRequest, request, "m").conversation
    messages, tools = to_chat(conversation)
    prompt = encode_messages(messages, "thinking", tools=tools)
    print(f"{args.turns} turns, {len(prompt):,} prompt characters")
    steps = {
        "deepseek-recipe conversion": lambda: convert(state, dr.MessagesRequest, request, "m"),
        "to_chat": lambda: to_chat(conversation),
        "dsv4 encoder (rendering)": lambda: encode_messages(messages, "thinking", tools=tools),
    }
    for name, fn in steps.items():
        print(f"{name:28s} {best_ms(fn, args.repeat):7.3f} ms")


if __name__ == "__main__":
    main()
