"""BlockManager: tables per kind in source tokens, swa release, state slots, memory plan."""

from __future__ import annotations

import math
import random

import pytest
from conftest import tiny_config

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.block_pool import NULL_BLOCK_ID
from dsv4.cache.spec import build_cache_specs, state_bytes_per_seq
from dsv4.config import PRESETS
from dsv4.engine.engine_config import EngineConfig

B, W = 16, 8  # tiny config: block_size 16 tokens, sliding window 8


def make_manager(swa=16, csa=16, hca=16, slots=4) -> BlockManager:
    specs = build_cache_specs(tiny_config(), "bf16")
    return BlockManager(specs, B, {"swa": swa, "csa": csa, "hca": hca}, slots)


def test_tables_grow_in_source_tokens():
    bm = make_manager()
    assert bm.allocate("a", 0, 20)
    tables = bm.block_tables("a")
    assert len(tables["csa"]) == len(tables["hca"]) == 2  # ceil(20 / 16)
    assert len(tables["swa"]) == 2 and bm.swa_block_offset("a") == 0
    assert bm.state_slot("a") != NULL_BLOCK_ID
    assert bm.allocate("a", 20, 12)  # up to 32 tokens: still 2 blocks
    assert len(bm.block_tables("a")["csa"]) == 2
    assert bm.allocate("a", 32, 1)
    assert len(bm.block_tables("a")["csa"]) == 3
    assert NULL_BLOCK_ID not in bm.block_tables("a")["csa"]


def test_swa_blocks_behind_window_are_released():
    bm = make_manager()
    assert bm.allocate("a", 0, 48)  # tokens 0..47: 3 swa blocks
    assert len(bm.block_tables("a")["swa"]) == 3
    free_before = bm.num_free_blocks("swa")
    # next token at 48 reads [41, 48]: blocks 0 and 1 (tokens 0..31) are dead
    assert bm.release_swa_blocks("a", 48) == 2
    assert bm.swa_block_offset("a") == 2
    assert bm.num_free_blocks("swa") == free_before + 2
    assert bm.allocate("a", 48, 1)  # token 48 opens logical block 3
    assert bm.swa_block_offset("a") == 2 and len(bm.block_tables("a")["swa"]) == 2
    # a window straddling a boundary keeps both blocks: next token 52 reads [45, 52]
    assert bm.release_swa_blocks("a", 52) == 0
    assert bm.release_swa_blocks("a", 56) == 1  # [49, 56] lies in block 3 only
    # compressed kinds keep the whole history
    assert len(bm.block_tables("a")["csa"]) == len(bm.block_tables("a")["hca"]) == 4


def test_swa_release_happens_inside_allocate():
    bm = make_manager()
    assert bm.allocate("a", 0, 32)
    assert bm.allocate("a", 40, 8)  # first live block = (40 - 7) // 16 = 2
    assert bm.swa_block_offset("a") == 2
    assert len(bm.block_tables("a")["swa"]) == 1


def test_decode_holds_at_most_two_swa_blocks():
    bm = make_manager()
    assert bm.allocate("a", 0, 5)
    for pos in range(5, 200):
        assert bm.allocate("a", pos, 1)
        assert len(bm.block_tables("a")["swa"]) <= math.ceil((W - 1) / B) + 1
        first = bm.swa_block_offset("a")
        assert first * B <= max(0, pos - W + 1)  # window of token pos is covered
        assert (first + len(bm.block_tables("a")["swa"])) * B > pos


def test_allocate_is_all_or_nothing():
    bm = make_manager(swa=16, csa=4, hca=16)  # 3 usable csa blocks
    assert bm.allocate("a", 0, 32)
    snapshot = bm.block_tables("a")
    free = {k: bm.num_free_blocks(k) for k in ("swa", "csa", "hca")}
    assert not bm.can_allocate("b", 0, 32)
    assert not bm.allocate("b", 0, 32)
    assert not bm.has_request("b")
    assert not bm.allocate("a", 32, 32)
    # nothing changed but the release of the dead swa block 0 ([25, 32] lies in block 1)
    tables = bm.block_tables("a")
    assert tables["csa"] == snapshot["csa"] and tables["hca"] == snapshot["hca"]
    assert tables["swa"] == snapshot["swa"][1:]
    assert bm.num_free_blocks("csa") == free["csa"] and bm.num_free_blocks("hca") == free["hca"]
    assert bm.num_free_blocks("swa") == free["swa"] + 1
    assert bm.can_allocate("b", 0, 16) and bm.allocate("b", 0, 16)


def test_state_slots_are_a_fixed_pool():
    bm = make_manager(slots=2)
    assert bm.allocate("a", 0, 1) and bm.allocate("b", 0, 1)
    assert bm.state_slot("a") != bm.state_slot("b")
    assert not bm.can_allocate("c", 0, 1)
    bm.free("a")
    assert bm.allocate("c", 0, 1)


def test_free_everything_and_idempotent():
    bm = make_manager()
    for i, n in enumerate([3, 17, 40]):
        assert bm.allocate(f"r{i}", 0, n)
    assert not bm.all_free()
    for i in range(3):
        bm.free(f"r{i}")
        bm.free(f"r{i}")
    assert bm.all_free()


def test_shared_blocks_survive_one_owner():
    bm = make_manager()
    assert bm.allocate("a", 0, 16)
    block = bm.block_tables("a")["csa"][0]
    bm.pools["csa"].incref([block])  # as a prefix-cache hit would
    bm.free("a")
    assert bm.pools["csa"].ref_count(block) == 1
    bm.pools["csa"].free([block])
    assert bm.all_free()


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    bm = make_manager(swa=12, csa=12, hca=12, slots=3)
    progress: dict[str, int] = {}
    for _ in range(2000):
        rid = f"r{rng.randrange(6)}"
        if rid in progress and rng.random() < 0.1:
            bm.free(rid)
            del progress[rid]
            continue
        start = progress.get(rid, 0)
        n = rng.choice([1, 1, 1, 5, 20])
        ok = bm.can_allocate(rid, start, n)
        assert bm.allocate(rid, start, n) == ok
        if ok:
            progress[rid] = start + n
        held = [b for r in progress for b in bm.block_tables(r)["csa"]]
        assert len(held) == len(set(held))  # no block in two tables
        for kind, pool in bm.pools.items():
            owned = sum(len(bm.block_tables(r)[kind]) for r in progress)
            assert owned + pool.num_free_blocks == pool.num_usable_blocks
    for rid in list(progress):
        bm.free(rid)
    assert bm.all_free()


def test_can_fit_a_lone_request():
    bm = make_manager(swa=4, csa=5, hca=5)  # 3 usable swa blocks, 4 csa / hca
    assert bm.can_fit(64, max_chunk_tokens=8)
    assert not bm.can_fit(65, max_chunk_tokens=8)  # 5 csa blocks needed
    assert not bm.can_fit(64, max_chunk_tokens=32)  # a 32-token chunk may span 4 swa blocks


def test_plan_fits_the_budget():
    cfg = tiny_config()
    ec = EngineConfig(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                      block_size=B, kv_cache_memory=4 * 2**20)
    bm = BlockManager.from_config(cfg, ec)
    assert bm.num_state_slots == 8
    assert bm.memory_bytes() <= ec.kv_cache_memory
    assert bm.pools["csa"].num_blocks == bm.pools["hca"].num_blocks
    assert bm.pools["csa"].num_usable_blocks >= 512 // B
    assert bm.can_fit(512, 64)
    # the slack left over is less than one more csa + hca block
    specs = bm.specs
    row = specs["csa"].block_bytes(B) + specs["hca"].block_bytes(B)
    assert ec.kv_cache_memory - bm.memory_bytes() < row


def test_plan_shrinks_state_slots_then_refuses():
    cfg = tiny_config()
    specs = build_cache_specs(cfg, "bf16")
    small = EngineConfig(max_model_len=64, max_num_seqs=256, max_num_batched_tokens=32,
                         block_size=B, kv_cache_memory=40 * state_bytes_per_seq(specs))
    bm = BlockManager.from_config(cfg, small)
    assert 1 <= bm.num_state_slots < 256
    assert bm.memory_bytes() <= small.kv_cache_memory
    with pytest.raises(ValueError, match="kv_cache_memory"):
        BlockManager.from_config(cfg, small.replace(kv_cache_memory=1000))
    with pytest.raises(ValueError, match="not set"):
        BlockManager.from_config(cfg, small.replace(kv_cache_memory=None))


def test_block_size_must_match_ratios():
    with pytest.raises(ValueError, match="block_size"):
        BlockManager.from_config(tiny_config(), EngineConfig(block_size=12, kv_cache_memory=2**30))
    with pytest.raises(ValueError, match="block_size"):
        BlockManager.from_config(PRESETS["v4-flash"],
                                 EngineConfig(block_size=64, kv_cache_memory=2**30))


def test_flash_plan_at_80_gib():
    ec = EngineConfig(kv_cache_memory=80 * 2**30, kv_cache_dtype="fp8")
    bm = BlockManager.from_config(PRESETS["v4-flash"], ec)
    assert bm.num_state_slots == 256
    assert bm.memory_bytes() <= ec.kv_cache_memory
    tokens = bm.pools["csa"].num_usable_blocks * ec.block_size
    assert tokens > 20 * 2**20  # > 20M tokens of compressed history at fp8 + fp4 indexer


def caching_manager(swa=16, csa=16, hca=16, slots=4) -> BlockManager:
    specs = build_cache_specs(tiny_config(), "bf16", prefix_caching=True)
    return BlockManager(specs, B, {"swa": swa, "csa": csa, "hca": hca}, slots, b"seed")


def test_prefix_hit_shares_blocks_and_needs_only_the_last_window():
    bm = caching_manager()
    tokens = list(range(50))
    hashes = bm.hash_blocks([], tokens)
    assert len(hashes) == 3 and bm.hash_blocks(list(hashes), tokens) == hashes
    assert bm.allocate("a", 0, 50)
    assert bm.cache_blocks("a", hashes, 50) == 3
    bm.release_swa_blocks("a", 50)  # blocks 0, 1 are behind the window: freed, still cached
    prefix = bm.find_cached_prefix(hashes, 49)
    assert prefix.num_tokens == 48 and prefix.swa_offset == 2  # (48 - 8 + 1) // 16
    assert prefix.block_ids["csa"] == bm.block_tables("a")["csa"][:3]
    assert prefix.boundary_block == prefix.block_ids["swa"][-1]
    assert bm.find_cached_prefix(hashes, 47).num_tokens == 32  # at most max_tokens
    assert bm.allocate("b", 48, 5, prefix)
    assert bm.block_tables("b")["csa"][:3] == bm.block_tables("a")["csa"][:3]
    assert bm.pools["csa"].ref_count(prefix.block_ids["csa"][0]) == 2
    bm.free("a")
    bm.free("b")
    assert bm.all_free() and bm.pools["csa"].num_cached_blocks == 3


def test_a_hit_falls_back_to_the_last_boundary_whose_window_is_cached():
    bm = caching_manager(swa=6)
    tokens = list(range(64))
    hashes = bm.hash_blocks([], tokens)
    assert bm.allocate("a", 0, 64) and bm.cache_blocks("a", hashes, 64) == 4
    bm.free("a")  # tail first: block 3's swa block is the first to be evicted
    assert bm.allocate("x", 0, 17)  # two swa blocks: the never cached one, then block 3's
    assert bm.pools["swa"].lookup(hashes[3]) is None
    prefix = bm.find_cached_prefix(hashes, 63)
    assert prefix.num_tokens == 48  # csa / hca have block 3, the swa window does not
    bm.free("x")
    assert bm.all_free()


def test_allocation_counts_the_free_cached_blocks_a_hit_takes():
    bm = caching_manager(csa=4, hca=4)
    hashes = bm.hash_blocks([], list(range(48)))
    assert bm.allocate("a", 0, 48) and bm.cache_blocks("a", hashes, 48) == 3
    bm.free("a")
    prefix = bm.find_cached_prefix(hashes, 47)
    assert prefix.num_tokens == 32
    # 3 free csa blocks, 2 of them the hit's: 18 more tokens need 2 new blocks
    assert not bm.can_allocate("b", 32, 18, prefix)
    assert not bm.allocate("b", 32, 18, prefix)
    assert bm.pools["csa"].num_free_blocks == 3  # nothing was taken
    assert bm.allocate("b", 32, 16, prefix)
    with pytest.raises(ValueError, match="cached prefix"):
        bm.allocate("b", 32, 1, prefix)  # only a new request starts after a prefix
    bm.free("b")
    assert bm.all_free()


def test_caching_off_finds_nothing():
    bm = make_manager()
    assert not bm.caching and bm.find_cached_prefix([b"x"], 100).num_tokens == 0
    with pytest.raises(RuntimeError, match="off"):
        bm.hash_blocks([], [1, 2, 3])
