"""MTP speculative decoding: what a verify step costs, and the decode speed it buys.

The model is the benchmark config of engine_vs_transformers.py (6 layers, hidden 256, the real
129,280-token vocabulary, random weights) with its MTP block, fp32 on CPU. Random weights make
the MTP block's own drafts useless, so the speed is measured with the forced-right hook (the
drafts are the target's own greedy tokens, computed first without speculation: every draft is
accepted) while the MTP block still runs every step; the engines are stepped in turn so that a
busy spell on this shared machine hits every row of a table alike, and projected to the acceptance rates
DeepSeek reports for its MTP (0.6-0.9 per draft) from the measured step costs: a step with k
drafts yields (1 - a^(k+1)) / (1 - a) tokens on average when each draft is accepted with
probability a. The peer here is dsv4 itself with speculation off (transformers has no MTP
decoding path to compare with). Every speculative run is checked to give the same tokens.

    python benchmarks/speculative.py [--ks 1,2,3,4] [--tokens 64] [--prompt 1024]
        [--batch 32] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_transformers import CONFIG, compute_dtype, now, prompts  # noqa: E402

from dsv4.llm import LLM  # noqa: E402
from dsv4.model import write_checkpoint  # noqa: E402
from dsv4.sampling_params import SamplingParams  # noqa: E402

ACCEPTANCE = (0.6, 0.8, 0.9)


class Run:
    """One engine generating for a list of prompts, its steps timed."""

    def __init__(self, path: Path, device: str, k: int, batch: int) -> None:
        spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
        self.llm = LLM(path, device=device, dtype=compute_dtype(device), emulate_quant=False,
                       max_model_len=4096, kv_cache_memory=1 << 30, max_num_seqs=max(batch, 1),
                       max_num_batched_tokens=4096, speculative_config=spec)
        self.engine = self.llm.engine
        self.device = device
        self.step_times: list[tuple[float, int, bool]] = []  # (seconds, tokens, all decoding)
        self.draft_time = 0.0
        real_step = self.engine.step

        def step():
            decoding = all(r.num_computed_tokens >= r.num_tokens - 1
                           for r in self.engine.scheduler.running) and \
                not self.engine.scheduler.waiting
            t0 = now(device)
            outs = real_step()
            self.step_times.append((now(device) - t0, sum(len(o.new_token_ids) for o in outs),
                                    decoding))
            return outs

        self.engine.step = step
        proposer = self.engine.runner.proposer
        if proposer is not None:
            real_propose = proposer.propose

            def propose(*args):
                t0 = now(device)
                out = real_propose(*args)
                self.draft_time += now(device) - t0
                return out

            proposer.propose = propose

    def start(self, prompt_ids: list[list[int]], tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        self.out = {str(i): [] for i in range(len(prompt_ids))}
        for i, ids in enumerate(prompt_ids):
            self.engine.add_request(str(i), ids, params)

    def step(self) -> bool:
        """One step; False once every request finished."""
        if not self.engine.has_unfinished_requests():
            return False
        for o in self.engine.step():
            self.out[o.request_id] += o.new_token_ids
        return True

    def outputs(self) -> list[list[int]]:
        return [self.out[str(i)] for i in range(len(self.out))]

    def decode_stats(self, warmup: int = 2) -> tuple[float, float]:
        """(median seconds of a decode step, tokens per decode step) over the steady steps."""
        steady = [(t, n) for t, n, decoding in self.step_times if decoding][warmup:]
        steady = steady[:-1]  # the last step finishes (and may verify fewer drafts)
        if not steady:
            raise RuntimeError("no steady decode steps were timed: raise --tokens")
        return (statistics.median(t for t, _ in steady),
                sum(n for _, n in steady) / len(steady))


def forced_right(reference: dict[tuple[int, ...], list[int]]):
    def hook(request_id: str, so_far: list[int], proposed: list[int]) -> list[int]:
        for prompt, out in reference.items():
            if tuple(so_far[:len(prompt)]) == prompt:
                done = len(so_far) - len(prompt)
                return (out[done:done + len(proposed)] + [0] * len(proposed))[:len(proposed)]
        return proposed
    return hook


def expected_tokens(a: float, k: int) -> float:
    return (1 - a ** (k + 1)) / (1 - a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (single stream)")
    ap.add_argument("--batch", type=int, default=32, help="rows of the batched measure (0: skip)")
    ap.add_argument("--batch-prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size (default: the real 129,280, whose head is 6x the "
                         "layers' bytes here; in V4-Flash it is ~1/10 of a token's weights)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(CONFIG, num_nextn_predict_layers=1,
                         vocab_size=args.vocab or CONFIG.vocab_size)
        path = write_checkpoint(Path(tmp) / "ckpt", config, tokenizer=False)
        print(f"vocabulary {config.vocab_size}")
        shapes = [("single stream", [args.prompt], args.tokens)]
        if args.batch:
            shapes.append((f"{args.batch} rows", [args.batch_prompt] * args.batch, 32))
        for name, lengths, tokens in shapes:
            ids = [[t % config.vocab_size for t in p] for p in prompts(lengths, len(lengths))]
            plain = Run(path, args.device, 0, len(ids))
            plain.start(ids, tokens)
            while plain.step():
                pass
            want = plain.outputs()
            # every engine from the start, stepped in turn: a busy spell on this shared machine
            # hits them alike
            runs = {0: Run(path, args.device, 0, len(ids))}
            for k in ks:
                runs[k] = Run(path, args.device, k, len(ids))
                runs[k].engine.runner.draft_override = forced_right(
                    {tuple(p): o for p, o in zip(ids, want)})
            for run in runs.values():
                run.start(ids, tokens)
            live = set(runs)
            while live:
                live = {k for k in live if runs[k].step()}
            for k, run in runs.items():
                if run.outputs() != want:
                    raise SystemExit(f"k={k}: outputs differ from the plain run")
            base_t, base_n = runs[0].decode_stats()
            base_rate = base_n / base_t
            print(f"\n## {name}: prompt {lengths[0]} tokens, {tokens} new tokens per row")
            print(f"no speculation: decode step {1e3 * base_t:.1f} ms, {base_rate:.1f} tok/s")
            print("| k | verify step (ms) | vs 1-token step | of it drafting (ms) | tokens/step "
                  "(forced right) | tok/s | speed-up | projected a=" +
                  " / ".join(f"{a}" for a in ACCEPTANCE) + " |")
            print("|---|---|---|---|---|---|---|---|")
            for k in ks:
                run = runs[k]
                t, n = run.decode_stats()
                steps = len(run.step_times)
                proj = [expected_tokens(a, k) * base_t / t for a in ACCEPTANCE]
                print(f"| {k} | {1e3 * t:.1f} | {t / base_t:.2f}x | "
                      f"{1e3 * run.draft_time / steps:.1f} | {n / len(ids):.2f} | "
                      f"{n / t:.1f} | {(n / t) / base_rate:.2f}x | "
                      + " / ".join(f"{p:.2f}x" for p in proj) + " |")

if __name__ == "__main__":
    main()
