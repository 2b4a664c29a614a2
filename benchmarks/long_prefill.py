"""dsv4 alone: a long prompt's prefill and a small decode batch, for A/B runs of a code change.

    python benchmarks/long_prefill.py [--tokens 16000] [--rounds 3]

One fixed tiny V4 (the architecture of the embedded demo v1: swa, csa with the indexer past its
top-k, hca; real vocabulary) in a fresh checkpoint, so two commits compare on the same model.
Each round times one --tokens prompt to its first token (chunked prefill, CSA layers selecting
from up to tokens/4 entries) and 8 requests of 50 prompt tokens decoding 64 tokens each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dsv4.config import ModelConfig
from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams

CONFIG = ModelConfig(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
    qk_rope_head_dim=32, q_lora_rank=64, o_groups=2, o_lora_rank=64,
    compress_ratios=(0, 4, 128, 4), index_n_heads=4, index_head_dim=32, index_topk=64,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1)


def _timed(llm: LLM, prompts: list[dict], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ids = [(7 * i) % 120000 + 100 for i in range(args.tokens)]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    decode = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", CONFIG, tokenizer=False, seed=0)
        llm = LLM(str(path), device="cpu", max_model_len=args.tokens + 64,
                  kv_cache_memory="1GiB")
        _timed(llm, [{"prompt_token_ids": ids[:2000]}], first)  # warm-up
        prefill, dec = [], []
        for _ in range(args.rounds):
            prefill.append(_timed(llm, [{"prompt_token_ids": ids}], first))
            dec.append(_timed(llm, [{"prompt_token_ids": ids[:50]}] * 8, decode))
    print(f"prefill of {args.tokens} tokens: " + " ".join(f"{t:.2f}" for t in prefill)
          + f" s (min {min(prefill):.2f}); 8 x 64 decode: " + " ".join(f"{t:.2f}" for t in dec)
          + f" s (min {min(dec):.2f})")


if __name__ == "__main__":
    main()
