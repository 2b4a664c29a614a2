"""Time to first token of a short request that arrives while a long prompt is being prefilled.

    python benchmarks/ttft_under_prefill.py [--long 30000] [--device cpu|cuda]

The engine runs behind AsyncLLM, as under `dsv4 serve`. A --long-token prompt is submitted; once
its prefill is well under way (after a quarter of the time a cold prefill of it takes), a 2-token
prompt arrives. Printed for two schedules: dsv4's default (chunked prefill, a step budget of
max_num_batched_tokens and long prefills capped at half of it, decodes and short prefills first)
and one step for the whole prompt (the budget raised to the prompt, no cap), i.e. no chunking:
the short request's time to first token, the long prefill's total time and the mean step time.
The short request joins the step after the one in flight when it arrives, so its TTFT is at most
about two steps: the rest of that step and its own. The model is the embedded demo's
architecture (real vocabulary, toy widths); no transformers run here, as it has no scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from dsv4.async_llm import AsyncLLM
from dsv4.demo import DEMO_CONFIG
from dsv4.engine_args import EngineArgs
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams


async def _first_token(llm: AsyncLLM, ids: list[int], max_tokens: int) -> tuple[float, float]:
    """Seconds to the first token and to the end."""
    t0 = time.perf_counter()
    first = None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async for out in llm.generate(ids, params):
        if first is None and out.new_token_ids:
            first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


async def _run(llm: AsyncLLM, long_ids: list[int], delay: float) -> tuple[float, float]:
    long_task = asyncio.create_task(_first_token(llm, long_ids, 1))
    await asyncio.sleep(delay)
    short_ttft, _ = await _first_token(llm, [1000, 2000], 1)
    long_ttft, _ = await long_task
    return short_ttft, long_ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=30000, help="tokens of the long prompt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    long_ids = [(7 * i) % 120000 + 100 for i in range(args.long)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", DEMO_CONFIG, tokenizer=False)
        common = dict(model=str(path), device=args.device, max_model_len=args.long + 64,
                      max_num_seqs=4, kv_cache_memory="1GiB")
        layouts = {"chunked (default)": EngineArgs(**common),
                   "one step (no chunking)": EngineArgs(**common,
                                                        max_num_batched_tokens=args.long + 64)}
        results = {}
        for name, engine_args in layouts.items():
            llm = AsyncLLM.from_engine_args(engine_args)
            if name.startswith("one step"):  # no cap: the running prefill takes the budget
                llm.engine.scheduler.long_prefill_token_threshold = args.long + 64
            steps = _time_steps(llm)
            try:
                # warm-up, and the cold prefill time that sets the short request's arrival
                cold, _ = asyncio.run(_first_token(llm, long_ids, 1))
                steps.clear()
                short, long = asyncio.run(_run(llm, long_ids, cold / 4))
                budget = llm.engine.config.max_num_batched_tokens
            finally:
                llm.shutdown()
            step = sum(steps) / len(steps)
            results[name] = (short, step)
            print(f"{name}: step budget {budget} tokens; short request's TTFT {short:.3f} s; "
                  f"long prefill {long:.3f} s in {len(steps)} steps of {step:.3f} s on average "
                  f"(cold, alone: {cold:.3f} s); TTFT / mean step = {short / step:.2f}")
        one_step, chunked = results["one step (no chunking)"][0], results["chunked (default)"][0]
        print(f"short TTFT ratio one-step / chunked = {one_step / max(chunked, 1e-9):.1f}x")


def _time_steps(llm: AsyncLLM) -> list[float]:
    """Durations of the engine's steps from now on (the engine thread appends to the list)."""
    durations: list[float] = []
    step = llm.engine.step

    def timed():
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            durations.append(time.perf_counter() - t0)

    llm.engine.step = timed
    return durations


if __name__ == "__main__":
    main()
