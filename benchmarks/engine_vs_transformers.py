"""dsv4's engine vs transformers' DeepseekV4ForCausalLM, same random weights, one process.

Tiny config with the real 129,280-token vocabulary: 6 layers (2 swa, 2 csa, 2 hca), hidden 256,
8 heads x 64, 8 experts top-2; fp32 on CPU (bf16 on CUDA). Prints ratios dsv4 / transformers.
The context rows step one engine per context in turn, so machine noise hits them alike.

    python benchmarks/engine_vs_transformers.py [--parts decode,batch,prefill,context]
        [--device cpu|cuda] [--threads N] [--contexts 1024,8192,32768,131072] [--hf-max-context 8192]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv4.config import ModelConfig
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine_args import EngineArgs
from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams

CONFIG = ModelConfig(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=64,
    qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64,
    compress_ratios=(0, 0, 4, 128, 4, 128), index_n_heads=4, index_head_dim=32, index_topk=512,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, num_hash_layers=1,
    num_nextn_predict_layers=0, weight_dtype=None, expert_dtype=None, scale_fmt=None,
)


# the 32 concurrent requests: prompts of 16-511 tokens (8,124 in all), 32 new tokens each
BATCH_LENGTHS = [16 + (i * 97) % 500 for i in range(32)]


def compute_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def gemm_peak(device: str) -> float:
    """Best fp32 (bf16 on CUDA) GEMM rate of a few prefill-like shapes, GFLOP/s."""
    dtype = compute_dtype(device)
    best = 0.0
    for m, k, n in [(4096, 256, 256), (4096, 256, 512), (4096, 1024, 1024)]:
        a = torch.randn(m, k, dtype=dtype, device=device)
        w = torch.randn(k, n, dtype=dtype, device=device)
        a @ w
        t0 = now(device)
        for _ in range(10):
            a @ w
        best = max(best, 2 * m * k * n * 10 / (now(device) - t0) / 1e9)
    return best


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


class Bench:
    def __init__(self, path: Path, device: str) -> None:
        import transformers

        self.device = device
        dtype = compute_dtype(device)
        self.llm = LLM(path, device=device, dtype=dtype, emulate_quant=False,
                       max_model_len=160_000, kv_cache_memory=2 << 30,
                       max_num_batched_tokens=4096)
        self.hf = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        self.hf.eval()

    def dsv4_generate(self, ps: list[list[int]], max_tokens: int) -> tuple[float, list]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0 = now(self.device)
        outs = self.llm.generate(prompt_token_ids=ps, sampling_params=params)
        return now(self.device) - t0, outs

    def hf_generate(self, p: list[int], max_tokens: int) -> tuple[float, list[int]]:
        ids = torch.tensor([p], device=self.device)
        t0 = now(self.device)
        with torch.no_grad():
            out = self.hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                   do_sample=False)
        return now(self.device) - t0, out[0, len(p):].tolist()

    def hf_generate_rate(self, ctx: int, n: int) -> float:
        """transformers' `generate()` tokens/s after a ctx-token prompt, the issue's baseline:
        generate(n + 1 tokens) minus generate(1 token) (the prefill), over n tokens."""
        p = prompts([ctx], seed=ctx)[0]
        t_prefill = min(self.hf_generate(p, 1)[0] for _ in range(2))
        return n / (self.hf_generate(p, n + 1)[0] - t_prefill)

    def head_gemv_ms(self) -> float:
        """One token's logits GEMV alone, as dsv4 lays the head out: a floor under any
        engine's per-token time on this config (the head is 129,280 x 256)."""
        w = self.llm.engine.runner.model.head.weight
        x = torch.randn(1, w.shape[1], dtype=w.dtype, device=self.device)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        t0 = now(self.device)
        for _ in range(20):
            torch.nn.functional.linear(x, w)
        return (now(self.device) - t0) / 20 * 1000

    def decode_rate(self, ctx: int, n: int, hf: bool, warm: int = 3) -> float:
        """Single-stream decode tokens/s after a `ctx`-token prompt: prefill, `warm` untimed
        steps (the first steps after a long prefill pay for fresh memory), then n timed steps
        of one token; the rate is 1 / the median step time (this machine is shared and single
        steps spike). dsv4: engine steps; transformers: forwards with its cache, which is
        what generate() runs per token."""
        p = prompts([ctx], seed=ctx)
        times = []
        if hf:
            with torch.no_grad():
                out = self.hf(torch.tensor(p, device=self.device), use_cache=True,
                              logits_to_keep=1)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
                for i in range(warm + n):
                    t0 = now(self.device)
                    out = self.hf(nxt, cache=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                    times.append(now(self.device) - t0)
        else:
            eng = self.llm.engine
            eng.add_request(f"ctx{ctx}", p[0], SamplingParams(
                temperature=0, max_tokens=warm + n + 2, ignore_eos=True))
            while not any(o.new_token_ids for o in eng.step()):
                pass  # prefill (chunked) until the first token
            for _ in range(warm + n):
                t0 = now(self.device)
                eng.step()
                times.append(now(self.device) - t0)
            eng.abort_request(f"ctx{ctx}")
        return 1 / statistics.median(times[warm:])

    def context_decode_ms(self, contexts: list[int], n: int = 24, warm: int = 3
                          ) -> dict[int, float]:
        """dsv4 decode ms/token after each prompt length, measured round-robin so that a busy
        spell on this shared machine hits every context alike: one engine per context on the
        one loaded model, each prefilled, then one decode step of each in turn (`warm` rounds
        untimed); the median step per context."""
        model = self.llm.engine.model
        engines = {}
        for ctx in contexts:
            eng = LLMEngine(model, EngineArgs(
                max_model_len=ctx + warm + n + 8, kv_cache_memory=256 << 20,
                max_num_batched_tokens=4096, max_num_seqs=1).create_engine_config(model))
            eng.add_request(f"ctx{ctx}", prompts([ctx], seed=ctx)[0], SamplingParams(
                temperature=0, max_tokens=warm + n + 2, ignore_eos=True))
            while not any(o.new_token_ids for o in eng.step()):
                pass  # prefill (chunked) until the first token
            engines[ctx] = eng
        times: dict[int, list[float]] = {ctx: [] for ctx in contexts}
        for _ in range(warm + n):
            for ctx, eng in engines.items():
                t0 = now(self.device)
                eng.step()
                times[ctx].append(now(self.device) - t0)
        return {ctx: 1000 * statistics.median(t[warm:]) for ctx, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="decode,batch,prefill,context")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--hf-max-context", type=int, default=8192)
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--hf-prefill-tokens", type=int, default=8192,
                    help="transformers' eager attention holds [heads, T, T] fp32 scores: 16K "
                         "tokens need > 24 GB, so it prefills fewer (a conservative ratio)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", CONFIG, tokenizer=False, extra_config={
            "layer_types": CONFIG.to_hf_dict()["layer_types"]})
        b = Bench(path, args.device)
        print(f"device={args.device} threads={torch.get_num_threads()} config: 6 layers "
              f"(swa,swa,csa,hca,csa,hca), hidden 256, vocab {CONFIG.vocab_size}")
        # warm-up and parity gate: same greedy tokens
        p = prompts([200], seed=1)
        _, ours = b.dsv4_generate(p, 8)
        _, theirs = b.hf_generate(p[0], 8)
        print(f"greedy parity (200-token prompt, 8 tokens): "
              f"{'identical' if ours[0].outputs[0].token_ids == theirs else 'DIFFERENT'}")

        if "decode" in parts:
            ours = b.decode_rate(1024, 32, hf=False)
            theirs = b.decode_rate(1024, 32, hf=True)
            gen = b.hf_generate_rate(1024, 32)
            head = b.head_gemv_ms()
            print(f"single-stream decode @1K: dsv4 {ours:.1f} tok/s; transformers generate() "
                  f"{gen:.1f} tok/s -> {ours / gen:.1f}x; transformers forward loop "
                  f"{theirs:.1f} tok/s -> {ours / theirs:.1f}x")
            print(f"  head GEMV alone {head:.2f} ms/token (ceiling {1000 / head:.0f} tok/s); "
                  f"5x generate() needs {1000 / (5 * gen):.2f} ms/token")
        if "batch" in parts:
            ps = prompts(BATCH_LENGTHS, seed=2)
            t_ours, outs = b.dsv4_generate(ps, 32)
            n_ours = sum(len(o.outputs[0].token_ids) for o in outs)
            t_theirs = sum(b.hf_generate(p_, 32)[0] for p_ in ps)
            print(f"32 concurrent requests (prompts 16-511, 32 tokens each): dsv4 batched "
                  f"{n_ours / t_ours:.1f} tok/s, transformers one by one "
                  f"{32 * 32 / t_theirs:.1f} tok/s -> {(n_ours / t_ours) / (1024 / t_theirs):.1f}x")
            with FlopCounterMode(display=False) as flops:  # a second, untimed run
                b.dsv4_generate(ps, 32)
            gflop = flops.get_total_flops() / 1e9
            print(f"  dsv4: {gflop:.0f} GFLOP of matmuls in {t_ours:.2f} s = "
                  f"{gflop / t_ours:.0f} GFLOP/s; 20x needs it in {t_theirs / 20:.2f} s = "
                  f"{gflop * 20 / t_theirs:.0f} GFLOP/s; this machine's fp32 GEMM peak: "
                  f"{gemm_peak(args.device):.0f} GFLOP/s")
        if "prefill" in parts:
            n, n_hf = args.prefill_tokens, min(args.prefill_tokens, args.hf_prefill_tokens)
            ps = prompts([n], seed=3)
            t_ours, _ = b.dsv4_generate(ps, 1)
            ids = torch.tensor([ps[0][:n_hf]], device=args.device)
            t0 = now(args.device)
            with torch.no_grad():
                b.hf(ids, logits_to_keep=1)
            t_theirs = now(args.device) - t0
            print(f"prefill: dsv4 {n / t_ours:.0f} tok/s at {n} tokens, transformers "
                  f"{n_hf / t_theirs:.0f} tok/s at {n_hf} tokens -> "
                  f"{(n / t_ours) / (n_hf / t_theirs):.1f}x")
        if "context" in parts:
            contexts = [int(c) for c in args.contexts.split(",")]
            ours = b.context_decode_ms(contexts)
            for ctx in contexts:
                ms = ours[ctx]
                line = (f"decode @{ctx}: dsv4 {ms:.1f} ms/token "
                        f"({ms / ours[contexts[0]]:.2f}x of first)")
                if ctx <= args.hf_max_context:
                    hf_ms = 1000 / b.decode_rate(ctx, 8, hf=True)
                    line += f", transformers {hf_ms:.1f} ms/token -> {hf_ms / ms:.1f}x"
                print(line, flush=True)


if __name__ == "__main__":
    main()
