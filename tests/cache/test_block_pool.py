"""BlockPool: free queue, ref counts, the null block."""

from __future__ import annotations

import pytest

from dsv4.cache.block_pool import NULL_BLOCK_ID, BlockPool


def test_allocate_and_free_round_trip():
    pool = BlockPool(5, "csa")
    assert pool.num_free_blocks == pool.num_usable_blocks == 4
    ids = pool.allocate(3)
    assert NULL_BLOCK_ID not in ids and len(set(ids)) == 3
    assert all(pool.ref_count(b) == 1 for b in ids)
    assert pool.num_free_blocks == 1 and pool.usage == 0.75
    assert pool.free(ids) == 3
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_all_or_nothing_and_zero():
    pool = BlockPool(3)
    assert pool.allocate(0) == []
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_ref_counts_share_blocks():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.incref(ids)
    assert [pool.ref_count(b) for b in ids] == [2, 2]
    assert pool.free(ids) == 0  # still referenced once
    assert pool.num_free_blocks == 1
    assert pool.free(ids) == 2
    assert pool.num_free_blocks == 3


def test_errors_on_misuse():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])
    with pytest.raises(RuntimeError, match="incref"):
        pool.incref([block])
    with pytest.raises(RuntimeError):
        pool.incref([NULL_BLOCK_ID])
    assert pool.free([NULL_BLOCK_ID]) == 0  # freeing the null block is a no-op
    with pytest.raises(ValueError):
        BlockPool(0)


def test_freed_blocks_are_reused_last():
    pool = BlockPool(4)
    first = pool.allocate(1)
    pool.free(first)
    assert pool.allocate(3)[-1] == first[0]


def test_cached_blocks_stay_findable_until_evicted_least_recently_freed_first():
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    assert pool.cache_block(a, b"ha") and pool.cache_block(b, b"hb")
    assert not pool.cache_block(c, b"ha")  # another block holds that content already
    assert not pool.cache_block(a, b"hx")  # a block keeps its first hash
    pool.free([b])
    pool.free([a])
    pool.free([c])
    assert pool.num_free_blocks == 3 and pool.lookup(b"ha") == a and pool.lookup(b"hb") == b
    pool.touch([a])  # a hit takes a free cached block off the free queue
    assert pool.ref_count(a) == 1 and pool.num_free_blocks == 2
    assert pool.allocate(1) == [b]  # b was freed before c: evicted first
    assert pool.lookup(b"hb") is None and pool.num_evictions == 1
    assert pool.lookup(b"ha") == a  # held again, still findable
    with pytest.raises(RuntimeError, match="uncached"):
        pool.touch([c])
    assert pool.reset_cache() == 1 and pool.lookup(b"ha") is None
