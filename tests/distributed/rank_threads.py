"""Run one function per rank on threads of this process, over gloo groups on a shared HashStore
(as torch's own distributed tests do): parity tests without the cost of spawning processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from conftest import tiny_config

from dsv4.config import ModelConfig
from dsv4.distributed import ParallelConfig, ParallelContext

__all__ = ["run_ranks", "parallel_test_config"]


def run_ranks(config: ParallelConfig, fn: Callable[[ParallelContext], Any],
              timeout: float = 120.0) -> list[Any]:
    """fn(context) on every rank at once; returns the results in rank order, or raises the first
    rank's error."""
    store = dist.HashStore()
    results: list[Any] = [None] * config.world_size
    errors: list[BaseException] = []
    threads_before = torch.get_num_threads()

    def target(rank: int) -> None:
        try:
            ctx = ParallelContext.build(config, rank, store, "gloo", timedelta(seconds=timeout))
            results[rank] = fn(ctx)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,), daemon=True)
               for r in range(config.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"ranks still running after {timeout} s")
    return results


def parallel_test_config(**overrides) -> ModelConfig:
    """The tiny model with every split dimension divisible by 4 and block-aligned in FP8/FP4:
    8 query and 8 indexer heads, 4 output groups, 8 experts of width 128, a top-k of 8 so
    short prompts reach the indexer's selection."""
    base = dict(num_attention_heads=8, head_dim=64, o_groups=4, o_lora_rank=128,
                index_n_heads=8, index_head_dim=64, index_topk=8, moe_intermediate_size=128)
    base.update(overrides)
    return tiny_config(**base)
