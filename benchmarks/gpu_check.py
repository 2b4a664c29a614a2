"""The GPU check: on a CUDA machine, with nothing installed beyond the README, (1) run the kernel
tests compiled on the GPU, (2) run the model's CUDA parity tests, (3) time one real-width
V4-Flash layer of each kind (swa / csa / hca; random weights in the released precision: FP8
block-scaled linears with ue8m0 scales, FP4 routed experts) for one decode step at batch 1, 8 and
64 over a synthetic 8K-token context, with every op on torch (eager) and with the Triton kernels
(dsv4.ops' default on CUDA), and print a table. It bounds itself: ~8 minutes in all (--budget).

    python benchmarks/gpu_check.py              # a GPU machine
    python benchmarks/gpu_check.py --dry-run    # CPU: the tiny path, kernels interpreted

The CUDA-graph column is "n/a": dsv4 has no captured decode step on this branch yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = (("swa", 0), ("csa", 4), ("hca", None))  # None: the config's HCA ratio


def tiny_config():
    """The tests' tiny V4 (toy widths, real layer kinds) with top-k small enough to be used."""
    from dsv4.config import ModelConfig

    return ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        compress_ratios=(0, 4, 8, 4), index_n_heads=2, index_head_dim=32, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, num_hash_layers=0,
        hc_mult=4, hc_sinkhorn_iters=5, original_max_position_embeddings=32, rope_factor=4.0,
        num_nextn_predict_layers=0)


def random_block(config, ratio: int, device: str, dtype: torch.dtype, seed: int = 0):
    """One Block of `ratio` with random weights stored as the release stores them."""
    from dsv4.model.deepseek_v4 import Block
    from dsv4.model.linear import Linear

    torch.manual_seed(seed)
    with torch.device(device):
        block = Block(config, ratio, is_hash=False)

    def scales(t: torch.Tensor, exponent: int) -> None:  # ue8m0 bytes around 2^exponent
        if t.dtype == torch.float8_e8m0fnu:
            t.data = torch.randint(126 + exponent, 129 + exponent, t.shape, dtype=torch.uint8,
                                   device=device).view(torch.float8_e8m0fnu)
        else:  # float32 scales (the -Base checkpoints)
            t.data.fill_(2.0**exponent)

    quantized = set()
    for mod in block.modules():
        if not isinstance(mod, Linear):
            continue
        if mod.fmt == "fp8":
            w = (torch.randn(mod.weight.shape, device=device) * 100).clamp(-448, 448)
            mod.weight.data = w.to(torch.float8_e4m3fn)  # ~0.02 once scaled by 2^-12
            scales(mod.scale, -12)
        elif mod.fmt == "fp4":  # packed e2m1 pairs
            mod.weight.data = torch.randint(-128, 128, mod.weight.shape, dtype=torch.int8,
                                            device=device)
            scales(mod.scale, -6)
        else:
            mod.weight.data = (torch.randn(mod.weight.shape, device=device) * 0.02).to(dtype)
        quantized.update(id(p) for p in mod.parameters())
    for name, p in block.named_parameters():
        if id(p) in quantized:
            continue
        if name.endswith(("norm.weight", "_scale")):
            p.data.fill_(1.0)
        elif name.endswith(("_base", "bias", "attn_sink")):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02)
    return block


def time_step(block, layer: int, config, batch: int, context: int, device: str,
              dtype: torch.dtype, steps: int, deadline: float) -> float | None:
    """Median seconds of one decode step of `block` for `batch` rows (None: out of time)."""
    from dsv4.model.attention import Segment
    from dsv4.model.sequence_cache import SequenceCache

    cache = SequenceCache.synthetic(config, context, batch=batch, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(1)
    for st in cache.layers:  # random entries, so the indexer's top-k is not all ties
        for cs in (st.compressor, st.indexer):
            if cs is not None and cs.entries is not None:
                cs.entries.normal_(generator=g)
    h = torch.randn(batch, 1, config.hc_mult, config.hidden_size, device=device, dtype=dtype,
                    generator=g)
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device, generator=g)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):  # the first step warms up (Triton compiles here)
            if time.monotonic() > deadline:
                return None
            pos = cache.num_tokens
            sync()
            t = time.perf_counter()
            block(h, ids, [Segment(0, 1, pos, cache.layers[layer])])
            sync()
            if i:
                times.append(time.perf_counter() - t)
            cache.num_tokens = pos + 1
    return statistics.median(times)


def run_pytest(paths: list[str], timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    try:
        out = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output") + ("" if out.returncode == 0 else
                                                    f" (exit {out.returncode})")


def layer_table(config, device: str, dtype: torch.dtype, batches: list[int], context: int,
                steps: int, deadline: float) -> list[tuple]:
    from dsv4.ops import configure

    rows = []
    for kind, ratio in KINDS:
        ratio = config.hca_ratio if ratio is None else ratio
        layer = list(config.compress_ratios).index(ratio)
        block = random_block(config, ratio, device, dtype)
        for b in batches:
            cells = []
            for spec in ("all=torch", ""):  # eager torch; the device's default (Triton on CUDA)
                configure(device, spec if device == "cuda" else spec or "all=triton")
                try:
                    cells.append(time_step(block, layer, config, b, context, device, dtype,
                                           steps, deadline))
                except Exception as exc:  # noqa: BLE001 (one failing cell must not hide the rest)
                    cells.append(f"error: {type(exc).__name__}: {str(exc)[:120]}")
            rows.append((kind, b, *cells))
            print(_row(rows[-1]), flush=True)
        del block
        if device == "cuda":
            torch.cuda.empty_cache()
    configure(device, "")
    return rows


def _ms(t: float | str | None) -> str:
    if isinstance(t, str):
        return t
    return "skip (time)" if t is None else f"{t * 1e3:.3f}"


def _row(row: tuple) -> str:
    kind, b, eager, triton = row
    timed = all(isinstance(t, float) for t in (eager, triton))
    speedup = f"{eager / triton:.2f}x" if timed else "-"
    return f"| {kind} | {b} | {_ms(eager)} | {_ms(triton)} | n/a | {speedup} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: the tiny config through the interpreted kernels, no pytest")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for everything")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,64; dry: 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per cell")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    if args.dry_run:
        # before any kernel module is imported: triton reads it when a kernel is decorated
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, config, context = "cpu", torch.float32, tiny_config(), 32
        batches = [int(b) for b in (args.batches or "1,2").split(",")]
        steps = args.steps or 1
    else:
        if not torch.cuda.is_available():
            print("gpu_check needs a CUDA GPU (none here); `--dry-run` checks the script on "
                  "the CPU with the tiny config.", file=sys.stderr)
            return 2
        from dsv4.config import PRESETS

        device, dtype, config, context = "cuda", torch.bfloat16, PRESETS["v4-flash"], 8192
        batches = [int(b) for b in (args.batches or "1,8,64").split(",")]
        steps = args.steps or 10
    import importlib.util

    have_triton = importlib.util.find_spec("triton") is not None
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}; "
          f"torch {torch.__version__}; triton "
          f"{__import__('triton').__version__ if have_triton else 'not installed'}")
    if device == "cuda":
        for what, paths, share in (("kernel tests (compiled on the GPU)", ["tests/kernels"], 0.3),
                                   ("model CUDA parity tests", ["tests/model/test_cuda.py"],
                                    0.2)):
            budget = max(10.0, share * args.budget)
            print(f"{what}: {run_pytest(paths, min(budget, deadline - time.monotonic()))}",
                  flush=True)
    from dsv4.ops import resolve

    print("ops:", ", ".join(f"{k}={v}" for k, v in resolve(
        device, "" if device == "cuda" else "all=triton").items()))
    print(f"\none decode step of one layer, ms (median of {steps}; context {context}; "
          f"{'V4-Flash widths' if device == 'cuda' else 'tiny widths'})")
    print("| layer | batch | eager torch | triton ops | cuda graphs | speedup |")
    print("|---|---|---|---|---|---|")
    rows = layer_table(config, device, dtype, batches, context, steps, deadline)
    print(f"\ntotal {time.monotonic() - start:.0f} s")
    return 0 if all(isinstance(t, float) for r in rows for t in r[2:]) else 1


if __name__ == "__main__":
    sys.exit(main())
