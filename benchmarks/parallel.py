"""Per-rank memory and communication of tensor / expert parallelism.

    python benchmarks/parallel.py [--experts 64] [--tp 1 2 4] [--dir /tmp/dsv4-parallel]

1. Memory. The checkpoint of benchmarks/load_memory.py (one real-width V4-Flash layer of each
   kind, FP8 linears, FP4 experts, BF16 embedding and head; --experts routed experts per layer)
   is loaded by TP x 1 ranks, each a process of its own that reads only its slices, with the
   experts split whole (EP). Printed per rank: bytes of the model's tensors, split into the parts
   that are sharded (attention's split projections and sinks, the indexer's, embedding, head,
   routed experts) and the replicated rest, the sharded bytes against total / N, and the
   process's resident memory after loading.
2. Communication. On a small config (threads over gloo) one forward of T tokens at TP 2 is
   counted collective by collective: payload bytes one rank puts in, per token and per layer,
   against the formula (fp32 on the CPU: hidden x 4 B per all-reduce, one per sub-layer; the
   indexer's [T, entries] scores on CSA layers past the top-k; the embedding's all-reduce and
   the head's vocab/tp logits per token once per model).

No transformers here: it has no parallel loading to compare against.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from load_memory import rss_bytes  # benchmarks/ is on the path of a script run from it

from dsv4.config import PRESETS, ModelConfig
from dsv4.distributed import ParallelConfig, ParallelContext
from dsv4.engine.executor import free_port
from dsv4.model import load_model, write_checkpoint

SHARDED_PARTS = ("attn.wq_b.", "attn.wo_a.", "attn.wo_b.", "attn.attn_sink", "indexer.wq_b.",
                 "indexer.weights_proj.", "embed.", "head.", "ffn.experts.")


def _is_sharded(name: str) -> bool:
    return name.startswith(("embed.", "head.")) or any(f".{p}" in name for p in SHARDED_PARTS)


def _load_rank(path: str, tp: int, rank: int, port: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, tp, is_master=rank == 0,
                          timeout=timedelta(seconds=600), wait_for_workers=False)
    layout = ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=tp > 1)
    ctx = ParallelContext.build(layout, rank, store, "gloo", timedelta(seconds=600))
    before = rss_bytes()
    model = load_model(path, device="cpu", progress=False, parallel=ctx)
    sharded = replicated = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        size = t.numel() * t.element_size()
        if _is_sharded(name):
            sharded += size
        else:
            replicated += size
    ctx.control.barrier()  # every rank loaded before anyone leaves
    out.put((rank, sharded, replicated, rss_bytes() - before))


def memory(path: Path, tps: list[int]) -> None:
    ctx = mp.get_context("spawn")
    whole = None
    print("| TP | rank | sharded GiB | x total/N | replicated GiB | RSS growth GiB |")
    print("|---|---|---|---|---|---|")
    for tp in tps:
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=_load_rank, args=(str(path), tp, r, port, queue))
                 for r in range(tp)]
        for p in procs:
            p.start()
        rows = sorted(queue.get() for _ in procs)
        for p in procs:
            p.join()
        if whole is None:
            whole = rows[0][1]
        for rank, sharded, replicated, rss in rows:
            print(f"| {tp} | {rank} | {sharded / 2**30:.3f} | {sharded / (whole / tp):.3f} | "
                  f"{replicated / 2**30:.3f} | {rss / 2**30:.3f} |", flush=True)


def communication(tokens: int) -> None:
    config = ModelConfig(
        vocab_size=4096, hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=4, o_lora_rank=128,
        sliding_window=16, compress_ratios=(0, 4, 8), index_n_heads=8, index_head_dim=64,
        index_topk=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        num_hash_layers=1, hc_mult=4, hc_sinkhorn_iters=5, num_nextn_predict_layers=0)
    path = write_checkpoint(Path(f"/tmp/dsv4-parallel-comm-{tokens}"), config, tokenizer=False)
    layout = ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    store, found = dist.HashStore(), {}
    ids = torch.randint(0, config.vocab_size, (1, tokens))

    def rank(r: int) -> None:
        ctx = ParallelContext.build(layout, r, store, "gloo")
        model = load_model(path, device="cpu", progress=False, parallel=ctx)
        for comm in (ctx.tp, ctx.moe):
            comm.bytes.clear()
            comm.counts.clear()
        model(ids)
        if r == 0:
            found["tp"], found["moe"] = dict(ctx.tp.bytes), dict(ctx.moe.bytes)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shutil.rmtree(path, ignore_errors=True)
    layers, d, t = config.num_hidden_layers, config.hidden_size, tokens
    csa = sum(r == 4 for r in config.compress_ratios)
    entries = t // 4  # CSA entries at the end of the prompt
    scores = t * entries * 4 if entries > config.index_topk else 0  # [T, E] fp32 per CSA layer
    want_tp = {"all_reduce": t * d * 4 * (1 + layers) + csa * scores,
               "all_gather": t * (config.vocab_size // 2) * 4}
    want_moe = {"all_reduce": t * d * 4 * layers}
    print(f"TP 2 + EP, {t} tokens, {layers} layers (hidden {d}, fp32 on the CPU); payload bytes "
          f"one rank puts in:")
    for group, got, want in (("tp", found["tp"], want_tp), ("moe", found["moe"], want_moe)):
        for kind in sorted(set(got) | set(want)):
            g, w = got.get(kind, 0), want.get(kind, 0)
            print(f"  {group}.{kind}: {g:,} B measured, {w:,} B by the formula "
                  f"({g / t / layers:,.0f} B per token per layer)")
    print(f"  per token per layer, attention + MoE all-reduce: {2 * d * 4} B (2 x hidden x 4 B); "
          f"a ring all-reduce moves 2 (N - 1) / N of that over each rank's link")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64,
                    help="routed experts per layer (Flash: 256; fewer writes faster)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the counted forward")
    ap.add_argument("--dir", default="/tmp/dsv4-parallel")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    communication(args.tokens)
    if args.skip_memory:
        return
    cfg = PRESETS["v4-flash"].replace(
        num_hidden_layers=3, compress_ratios=(0, 4, 128), num_hash_layers=1,
        n_routed_experts=args.experts, num_nextn_predict_layers=0)
    path = Path(args.dir)
    shutil.rmtree(path, ignore_errors=True)
    write_checkpoint(path, cfg, shard_bytes=2 << 30, tokenizer=False)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint: {disk / 2**30:.3f} GiB (swa/csa/hca at hidden 4096, {args.experts} FP4 "
          f"experts each)", flush=True)
    try:
        memory(path, args.tp)
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
