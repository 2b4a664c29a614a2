"""The engine's decode step against this machine's physical limit, measured in one process.

Config: the benchmark model of BENCHMARKS.md (6 layers swa,swa,csa,hca,csa,hca, hidden 256,
8 heads x 64, 8 experts top-2 + 1 shared, the real 129,280-token vocabulary), random weights,
fp32, `emulate_quant=False`. The limit of one step is max(bytes it must read / memory
bandwidth, matmul FLOPs / GEMM peak):

- bytes: every parameter the step touches, counted by watching the step's ops (a
  TorchDispatchMode): a parameter read by an op counts whole (the head, each layer's weights,
  the routed experts actually visited), except the embedding, which counts the rows looked up;
  plus the KV-cache bytes the step reads (each row's window and compressed entries, from the
  cache's formats; the compressor states' few rows are left out);
- FLOPs: torch's FlopCounterMode over the same step;
- bandwidth: the median of a large fp32 tensor's sum (bytes read / s); GEMM peak: the median
  of a 2048^3 fp32 matmul.

The step is timed through the real engine (`LLMEngine.step`) with 1 and with 32 running
requests after short prompts. Each round measures the bandwidth and the GEMM peak, then steps
every engine in turn, so that load from other work on this machine hits all of them alike;
every figure is a median over the rounds.

    python benchmarks/decode_limit.py [--rows 1,32] [--rounds 7] [--steps 8] [--prompt 64]
        [--threads N] [--modes eager,compiled]

`compiled` is the engine with `compile_decode=True` (DecodeGraphs); its engines compile during
the warm-up steps. Every (mode, rows) engine is stepped in each round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from engine_vs_transformers import CONFIG  # the benchmark model (beside this script)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams


def bandwidth_gbs(n_bytes: int = 512 << 20, reps: int = 5) -> float:
    """Read bandwidth: a large fp32 tensor's sum, median of `reps`."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return n_bytes / statistics.median(times) / 1e9


def gemm_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


class ParamReads(TorchDispatchMode):
    """Which parameters one step reads: storage pointer -> bytes counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.params = {p.untyped_storage().data_ptr(): (name, p.numel() * p.element_size())
                       for name, p in model.named_parameters()}
        self.embed_ptr = model.embed.weight.untyped_storage().data_ptr()
        self.read: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for a in [*args, *(kwargs or {}).values()]:
            if not isinstance(a, torch.Tensor) or a.device.type == "meta":
                continue
            ptr = a.untyped_storage().data_ptr()
            if ptr not in self.params:
                continue
            name, size = self.params[ptr]
            if ptr == self.embed_ptr:  # the rows looked up (each distinct row once)
                rows = out.reshape(-1, out.shape[-1]).unique(dim=0).shape[0]
                size = rows * out.shape[-1] * out.element_size()
            # a parameter several ops read (a transpose, then a matmul) counts once a step
            self.read[name] = max(self.read.get(name, 0), size)
        return out


def cache_bytes(engine, rows: int, context: int) -> int:
    """KV-cache bytes one decode step reads: per layer each row's window, plus every
    compressed entry (hca, and csa while entries <= index_topk) or the indexer keys and the
    top-k entries (csa past it)."""
    c, formats = CONFIG, engine.runner.kv_cache.formats

    def size(kind: str) -> int:
        fmt = formats[kind]
        return fmt.nbytes * torch.empty(0, dtype=fmt.storage_dtype).element_size()

    total = 0
    for ratio in c.compress_ratios:
        total += min(context, c.sliding_window) * size("swa")
        if ratio:
            n = context // ratio
            kind = "csa" if ratio == 4 else "hca"
            if ratio == 4 and n > c.index_topk:
                total += n * size("csa_index") + c.index_topk * size(kind)
            else:
                total += n * size(kind)
    return rows * total


def start(engine, rows: int, prompt: int, tag: str) -> None:
    g = torch.Generator().manual_seed(rows)
    for r in range(rows):
        ids = torch.randint(2, CONFIG.vocab_size, (prompt,), generator=g).tolist()
        engine.add_request(f"{tag}{r}", ids, SamplingParams(temperature=0, max_tokens=2_000,
                                                            ignore_eos=True))
    done = set()
    while len(done) < rows:  # prefill until every row has its first token
        done |= {o.request_id for o in engine.step() if o.new_token_ids}


class Timers:
    """Wall time of the model's trunk, head and sampler inside engine steps."""

    def __init__(self, runner) -> None:
        self.ms: dict[str, list[float]] = {"layers": [], "head": [], "sampler": []}
        self._wrap(runner.model, "run_layers", "layers")
        if runner.decode_graphs is not None:
            self._wrap(runner.decode_graphs, "run_layers", "layers")
        self._wrap(runner.model, "logits", "head")
        self._wrap(runner, "sampler", "sampler")

    def _wrap(self, owner, attr: str, key: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.ms[key].append(1000 * (time.perf_counter() - t0))
            return out

        setattr(owner, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="timed engine steps per round")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="eager,compiled")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ck", CONFIG, tokenizer=False)
        engines = {}
        for mode in modes:
            for rows in rows_list:
                llm = LLM(path, device="cpu", emulate_quant=False, max_model_len=4096,
                          kv_cache_memory=1 << 30, max_num_seqs=max(rows_list),
                          compile_decode=mode == "compiled")
                start(llm.engine, rows, args.prompt, f"r{rows}-")
                t0 = time.perf_counter()
                for _ in range(3):  # warm-up (and compilation)
                    llm.engine.step()
                print(f"{mode} rows={rows}: warm-up {time.perf_counter() - t0:.1f} s")
                engines[mode, rows] = llm.engine
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"prompt {args.prompt} tokens")

        # what a step reads and computes (one counted step per batch size, eager engines)
        need = {}
        for rows in rows_list:
            eng = engines[modes[0], rows]
            reads = ParamReads(eng.runner.model)
            with reads:
                eng.step()
            flops = FlopCounterMode(display=False)
            with flops:
                eng.step()
            context = args.prompt + 6
            head = sum(v for k, v in reads.read.items() if k.startswith("head"))
            weights = sum(reads.read.values())
            kv = cache_bytes(eng, rows, context)
            need[rows] = (weights + kv, flops.get_total_flops())
            print(f"rows={rows}: weights read {weights / 1e6:.1f} MB (head {head / 1e6:.1f}, "
                  f"layers+embedding {(weights - head) / 1e6:.1f}; "
                  f"{len(reads.read)} parameters touched), cache {kv / 1e6:.2f} MB, "
                  f"{flops.get_total_flops() / 1e9:.3f} GFLOP")

        bw, peak, steps = [], [], {key: [] for key in engines}
        timers = {key: Timers(e.runner) for key, e in engines.items()}
        for _ in range(args.rounds):
            bw.append(bandwidth_gbs())
            peak.append(gemm_peak_gflops())
            for _ in range(args.steps):  # one step of each engine in turn
                for key, eng in engines.items():
                    t0 = time.perf_counter()
                    eng.step()
                    steps[key].append(1000 * (time.perf_counter() - t0))
        bw_m, peak_m = statistics.median(bw), statistics.median(peak)
        print(f"memory bandwidth {bw_m:.1f} GB/s (read; {min(bw):.1f}-{max(bw):.1f}), "
              f"fp32 GEMM peak {peak_m:.0f} GFLOP/s ({min(peak):.0f}-{max(peak):.0f}); "
              f"{args.rounds} rounds")
        for (mode, rows), times in steps.items():
            n_bytes, flops = need[rows]
            t_mem, t_flop = n_bytes / bw_m / 1e6, flops / peak_m / 1e6
            limit = max(t_mem, t_flop)
            step = statistics.median(times)
            parts = {k: statistics.median(v) for k, v in timers[mode, rows].ms.items()}
            other = step - sum(parts.values())
            print(f"{mode} rows={rows}: limit {limit:.2f} ms (bytes {t_mem:.2f}, FLOPs "
                  f"{t_flop:.2f}); step {step:.2f} ms median of {len(times)} "
                  f"({min(times):.2f}-{max(times):.2f}); ratio {step / limit:.2f}; "
                  f"{1000 * rows / step:.0f} tok/s")
            print("  breakdown (medians, ms): " + ", ".join(
                f"{k} {v:.2f}" for k, v in parts.items()) + f", scheduler/python {other:.2f}")

if __name__ == "__main__":
    main()
