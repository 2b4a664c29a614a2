"""The fp32 head on the CPU: how it is laid out and multiplied, at the row counts a step has.

A decode step has one row per request, a verify step (speculative decoding) k + 1 per row. The
head of the benchmark config (129,280 x 256 fp32, 132 MB) is timed three ways, interleaved:
linear() over the [dim, vocab] storage dsv4 used before, linear() over the checkpoint's
[vocab, dim] layout, and dsv4's head_matmul over [vocab, dim] (weight @ x.T up to 16 rows).
The rate is bytes of the head over the median time.

    python benchmarks/head_matmul.py [--rows 1,2,3,5,8,16,32,64] [--reps 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dsv4.model.deepseek_v4 import head_matmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,5,8,16,32,64")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=129_280)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocab, args.dim)
    ways = {"linear, [dim, vocab] storage": (F.linear, weight.t().contiguous().t()),
            "linear, [vocab, dim]": (F.linear, weight),
            "head_matmul, [vocab, dim]": (head_matmul, weight)}
    mb = weight.numel() * 4 / 1e6
    print(f"head {args.vocab} x {args.dim} fp32 ({mb:.0f} MB), {torch.get_num_threads()} threads")
    print("| rows | " + " | ".join(f"{name} (ms, GB/s)" for name in ways) + " |")
    print("|---|" + "---|" * len(ways))
    with torch.inference_mode():
        for n in (int(r) for r in args.rows.split(",")):
            x = torch.randn(1, n, args.dim)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.reps):
                for name, (fn, w) in ways.items():
                    t0 = time.perf_counter()
                    fn(x, w)
                    times[name].append(time.perf_counter() - t0)
            cells = []
            for name in ways:
                t = statistics.median(times[name])
                cells.append(f"{1e3 * t:.1f}, {mb / 1e3 / t:.0f}")
            print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
