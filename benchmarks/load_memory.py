"""Resident memory after loading vs bytes on disk, at real V4-Flash width.

Builds a checkpoint with one real-width V4-Flash layer of each kind (swa, csa, hca; 256 FP4
experts each, FP8 linears, BF16 embedding and head, as released) from random weights, loads it
with dsv4 and reports the process's resident memory against the checkpoint's size on disk, next
to what the same weights would take expanded to bf16 (what transformers' dequantize path keeps).

    python benchmarks/load_memory.py [--experts 256] [--dir /tmp/dsv4-load-memory] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from pathlib import Path

import torch

from dsv4.config import PRESETS
from dsv4.model import load_model, write_checkpoint
from dsv4.model.linear import Linear


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256, help="routed experts per layer (Flash: 256)")
    ap.add_argument("--dir", default="/tmp/dsv4-load-memory")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args()

    cfg = PRESETS["v4-flash"].replace(
        num_hidden_layers=3, compress_ratios=(0, 4, 128), num_hash_layers=1,
        n_routed_experts=args.experts, num_nextn_predict_layers=0)
    path = Path(args.dir)
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    write_checkpoint(path, cfg, shard_bytes=2 << 30, tokenizer=False)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {disk / 2**30:.3f} GiB in {time.perf_counter() - t0:.0f}s "
          f"(layers swa/csa/hca at hidden 4096, {args.experts} FP4 experts each)")

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_model(path, device="cpu", progress=False)
    load_s = time.perf_counter() - t0
    tensors = sum(t.numel() * t.element_size()
                  for t in [*model.parameters(), *model.buffers()])
    bf16 = 0
    for mod in model.modules():
        if isinstance(mod, Linear):
            bf16 += mod.in_features * mod.out_features * 2
    bf16 += sum(p.numel() * 2 for n, p in model.named_parameters()
                if not any(n.startswith(m) for m, mod in model.named_modules()
                           if isinstance(mod, Linear) and m))
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    t0 = time.perf_counter()
    logits = model(ids)  # touches every weight (safetensors maps files lazily)
    fwd_s = time.perf_counter() - t0
    gc.collect()
    resident = rss_bytes() - before
    print(f"loaded in {load_s:.1f}s; first 8-token forward {fwd_s:.1f}s, "
          f"finite={bool(logits.isfinite().all())}")
    print(f"bytes on disk                   {disk / 2**30:8.3f} GiB")
    print(f"model tensors in memory         {tensors / 2**30:8.3f} GiB  ({tensors / disk:.3f}x)")
    print(f"process RSS growth after fwd    {resident / 2**30:8.3f} GiB  ({resident / disk:.3f}x)")
    print(f"same weights expanded to bf16   {bf16 / 2**30:8.3f} GiB  ({bf16 / disk:.3f}x)")
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
