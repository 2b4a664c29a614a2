"""Cost of structured outputs: decode steps of 32 rows with 0, 8 and 32 of them under a JSON
schema, and grammar compile times for the tool schemas of a typical coding agent.

    python benchmarks/structured.py [--rounds 5] [--steps 16] [--device cpu|cuda]

The model is the demo architecture (random weights, the real 129,280-token vocabulary). Each
round runs the three batch mixes one after the other, each leading a round in turn (so a busy
spell on a shared machine, or whatever the first mix after a round pays, hits all of them): 32 requests with 16-token prompts are prefilled, then ``--steps`` decode steps
are timed one by one. Constrained rows follow a schema that cannot end within the run (an array
of at least 100 objects with an integer, a bounded string and an enum list), so the batch stays
at 32 rows. Prints the median step time per mix, its ratio to the unconstrained one and the
CPU time per step (all threads of the process: steadier than wall time on a shared machine),
the time the driver spent computing masks (``StructuredOutputManager.prepare``), the time the
sampler takes to apply them (``Sampler.apply_grammar`` alone, 20 runs), and the overhead both
add to the unconstrained step: on a busy machine the step medians move more than the masks
cost, so that last column is the steadier ratio. Then it times the
one-time vocabulary conversion, compiling each tool's parameters schema, the DSML tool-call
grammar over all tools (what ``tool_choice: "required"`` uses) and a cache hit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv4.demo import DEMO_CONFIG
from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams
from dsv4.server.grammar import tool_call_grammar
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams

ROWS = 32
LONG = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "tags"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
                   "name": {"type": "string", "maxLength": 24},
                   "tags": {"type": "array", "maxItems": 4,
                            "items": {"enum": ["red", "green", "blue", "large", "small"]}}}}}


def _obj(props: dict, required: list[str]) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": props,
            "required": required}


_S = {"type": "string"}
_I = {"type": "integer", "minimum": 0}
# the tools of a typical coding agent (file, shell, search, edit, web, todo): 10 schemas
AGENT_TOOLS = {
    "read_file": _obj({"path": _S, "offset": _I, "limit": _I}, ["path"]),
    "write_file": _obj({"path": _S, "content": _S}, ["path", "content"]),
    "edit_file": _obj({"path": _S, "edits": {"type": "array", "items": _obj(
        {"old_text": _S, "new_text": _S, "replace_all": {"type": "boolean"}},
        ["old_text", "new_text"])}}, ["path", "edits"]),
    "list_dir": _obj({"path": _S, "recursive": {"type": "boolean"},
                      "ignore": {"type": "array", "items": _S}}, ["path"]),
    "run_shell": _obj({"command": _S, "timeout_s": {"type": "number", "minimum": 0},
                       "env": {"type": "object", "additionalProperties": _S}}, ["command"]),
    "grep": _obj({"pattern": _S, "path": _S, "case_sensitive": {"type": "boolean"},
                  "max_results": {"type": "integer", "minimum": 1, "maximum": 1000}},
                 ["pattern"]),
    "web_search": _obj({"query": _S, "num_results": {"type": "integer", "minimum": 1,
                                                     "maximum": 20},
                        "recency": {"enum": ["day", "week", "month", "any"]}}, ["query"]),
    "fetch_url": _obj({"url": {"type": "string", "pattern": "^https?://.+"},
                       "max_chars": _I}, ["url"]),
    "todo_write": _obj({"todos": {"type": "array", "items": _obj(
        {"content": _S, "status": {"enum": ["pending", "in_progress", "completed"]},
         "priority": {"enum": ["high", "medium", "low"]}},
        ["content", "status"])}}, ["todos"]),
    "ask_user": _obj({"question": _S, "options": {"type": "array", "items": _S,
                                                  "maxItems": 5}}, ["question"]),
}


def now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run_mix(llm: LLM, constrained: int, steps: int, tag: str, device: str
            ) -> tuple[list[float], list[float], float]:
    """Per-step wall and CPU seconds (all threads of the process) of ``steps`` decode steps,
    and the wall seconds spent in mask computation."""
    engine = llm.engine
    prompt = llm.tokenizer.encode("Write a long list of records for the catalogue please.")
    prompt = (prompt * 4)[:16]
    spec = StructuredOutputsParams(json=LONG)
    for i in range(ROWS):
        if i < constrained:
            params = SamplingParams(seed=i, max_tokens=steps + 8, structured_outputs=spec)
        else:
            params = SamplingParams(seed=i, max_tokens=steps + 8, ignore_eos=True)
        engine.add_request(f"{tag}-{i}", prompt, params)
    waiting = {f"{tag}-{i}" for i in range(ROWS)}
    while waiting:  # prefill: every row has its first token
        waiting -= {o.request_id for o in engine.step() if o.new_token_ids}
    prepare = engine.structured.prepare
    spent = [0.0]

    def timed(batch):
        t0 = time.perf_counter()
        try:
            return prepare(batch)
        finally:
            spent[0] += time.perf_counter() - t0

    engine.structured.prepare = timed
    times, cpu = [], []
    try:
        for _ in range(steps):
            t0, c0 = now(device), time.process_time()
            outs = engine.step()
            times.append(now(device) - t0)
            cpu.append(time.process_time() - c0)
            assert len(outs) == ROWS and not any(o.finished for o in outs), "a row ended early"
    finally:
        engine.structured.prepare = prepare
        for i in range(ROWS):
            engine.abort_request(f"{tag}-{i}")
    return times, cpu, spent[0]


def apply_times(vocab: int, rounds: int = 20) -> dict[int, float]:
    """Median seconds of Sampler.apply_grammar on [32, vocab] logits, for 8 and 32 rows."""
    from dsv4.engine.sampler import Sampler

    logits = torch.randn(ROWS, vocab)
    out = {}
    for k in (8, 32):
        bitmask = torch.randint(-2**31, 2**31 - 1, (k, (vocab + 31) // 32), dtype=torch.int32)
        rows = torch.arange(k) * (ROWS // k)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            Sampler.apply_grammar(logits, rows, bitmask)
            times.append(time.perf_counter() - t0)
        out[k] = statistics.median(times)
    return out


def compile_times(tokenizer) -> None:
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, DEMO_CONFIG.vocab_size)
    compiler.lltokenizer  # noqa: B018 - the one-time vocabulary conversion
    print(f"vocabulary conversion (once per process): {1e3 * (time.perf_counter() - t0):.0f} ms")
    per_tool = []
    for schema in AGENT_TOOLS.values():
        t0 = time.perf_counter()
        compiler.check(StructuredOutputsParams(json=schema))
        per_tool.append(time.perf_counter() - t0)
    print(f"{len(AGENT_TOOLS)} tool schemas as json_schema: total {1e3 * sum(per_tool):.1f} ms, "
          f"max {1e3 * max(per_tool):.1f} ms")
    grammar = tool_call_grammar(AGENT_TOOLS, None, force=True)
    t0 = time.perf_counter()
    compiler.check(StructuredOutputsParams(grammar=grammar))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        compiler.matcher(StructuredOutputsParams(grammar=grammar))
    hit = (time.perf_counter() - t0) / 100
    print(f"DSML tool-call grammar over all {len(AGENT_TOOLS)} tools ({len(grammar)} chars): "
          f"compile {1e3 * first:.1f} ms; cache hit + matcher copy {1e3 * hit:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}",
          file=sys.stderr)
    mixes = (0, 8, 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "demo", DEMO_CONFIG, seed=0)
        llm = LLM(path, device=args.device, max_model_len=1024, kv_cache_memory=256 << 20,
                  max_num_seqs=ROWS)
        compile_times(llm.tokenizer)
        run_mix(llm, 32, 2, "warm", args.device)  # first compile and allocations
        steps = {k: [] for k in mixes}
        cpus = {k: [] for k in mixes}
        masks = {k: 0.0 for k in mixes}
        for r in range(args.rounds):
            for k in mixes[r % 3:] + mixes[:r % 3]:  # each mix leads a round in turn
                times, cpu, spent = run_mix(llm, k, args.steps, f"{r}-{k}", args.device)
                steps[k] += times
                cpus[k] += cpu
                masks[k] += spent
    applied = apply_times(DEMO_CONFIG.vocab_size)
    base = statistics.median(steps[0])
    base_cpu = statistics.median(cpus[0])
    print(f"\n{ROWS} rows, {args.rounds} rounds x {args.steps} decode steps per mix")
    print("| constrained rows | median wall ms/step | vs 0 | median CPU ms/step | vs 0 | "
          "mask computation ms/step | mask application ms/step | (step 0 + both) / step 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for k in mixes:
        med, med_cpu = statistics.median(steps[k]), statistics.median(cpus[k])
        fill = masks[k] / len(steps[k])
        apply = applied.get(k, 0.0)
        print(f"| {k} | {1e3 * med:.1f} | {med / base:.3f}x | {1e3 * med_cpu:.1f} | "
              f"{med_cpu / base_cpu:.3f}x | {1e3 * fill:.2f} | {1e3 * apply:.2f} | "
              f"{(base + fill + apply) / base:.3f}x |")


if __name__ == "__main__":
    main()
