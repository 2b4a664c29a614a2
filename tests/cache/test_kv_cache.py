"""The paged storage allocates exactly the bytes the block accounting (and dsv4 analyze) plan."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from dsv4.analysis.kv import kv_bytes_per_sequence
from dsv4.cache.block_manager import BlockManager
from dsv4.cache.kv_cache import KVCache
from dsv4.cache.spec import build_cache_specs, kv_bytes_per_seq, state_bytes_per_seq
from dsv4.engine.engine_config import EngineConfig


@pytest.mark.parametrize("dtype,index_dtype,state_dtype", [
    ("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("fp8", None, "fp32"),
    ("fp8", "fp8", "fp32"), ("fp32", "fp32", "bf16"), ("fp64", "fp64", "fp64")])
def test_storage_matches_the_plan(dtype, index_dtype, state_dtype):
    cfg = tiny_config()
    ec = EngineConfig(max_model_len=512, block_size=16, max_num_batched_tokens=64,
                      kv_cache_memory=8 << 20, kv_cache_dtype=dtype, index_cache_dtype=index_dtype,
                      compressor_state_dtype=state_dtype)
    bm = BlockManager.from_config(cfg, ec)
    cache = KVCache(cfg, bm, "cpu", torch.float32, dtype, index_dtype, state_dtype)
    kv = sum(t.numel() * t.element_size() for t in [cache.swa, *cache.entries.values()])
    states = sum(t.numel() * t.element_size() for pair in cache.states.values() for t in pair)
    kept = sum(t.numel() * t.element_size() for pair in cache.boundaries.values()
               for t in pair)  # prefix caching's CSA state at block ends (on by default)
    assert kept > 0
    assert kv + states + kept == bm.memory_bytes() == cache.memory_bytes()
    assert bm.memory_bytes() <= ec.kv_cache_memory


def test_analyze_counts_the_engine_bytes():
    cfg = tiny_config()
    for fmt in ("bf16", "fp8"):
        specs = build_cache_specs(cfg, fmt)
        for n in (5, 100, 1000):
            parts = kv_bytes_per_sequence(cfg, n, fmt)
            assert parts["window"] + parts["compressed"] + parts["indexer"] == \
                kv_bytes_per_seq(specs, n)
            assert parts["state"] == state_bytes_per_seq(specs)
