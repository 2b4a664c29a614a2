"""dsv4 alone: the 32-request run of engine_vs_transformers.py split into its prefill and decode
phases, repeated, for A/B comparisons (a code change, an allocator under LD_PRELOAD).

    python benchmarks/engine_phases.py [--rounds 5] [--device cpu|cuda]

Each round adds the same 32 prompts (16-511 tokens), times the engine steps until every request
has its first token (prefill; 8,124 tokens in 4,096-token steps), then the steps until all 32
new tokens are out (decode). Prints min and median of each phase over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from engine_vs_transformers import BATCH_LENGTHS, CONFIG, compute_dtype, now, prompts

from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", CONFIG, tokenizer=False)
        engine = LLM(path, device=args.device, dtype=compute_dtype(args.device),
                     emulate_quant=False, max_model_len=4096, kv_cache_memory=2 << 30,
                     max_num_batched_tokens=4096).engine
        ps = prompts(BATCH_LENGTHS, seed=2)
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        prefill, decode = [], []
        for r in range(args.rounds):
            waiting = set()
            for i, p in enumerate(ps):
                engine.add_request(f"{r}-{i}", p, params)
                waiting.add(f"{r}-{i}")
            t0 = now(args.device)
            while waiting:
                waiting -= {o.request_id for o in engine.step() if o.new_token_ids}
            t1 = now(args.device)
            while engine.has_unfinished_requests():
                engine.step()
            prefill.append(t1 - t0)
            decode.append(now(args.device) - t1)
        for name, times in (("prefill", prefill), ("decode", decode)):
            print(f"{name}: min {min(times):.3f} s, median {statistics.median(times):.3f} s "
                  f"over {args.rounds} rounds")


if __name__ == "__main__":
    main()
