"""A step's slot tensors are built once and shared by every layer's stores, with the values the
block tables give."""

from __future__ import annotations

import torch

from conftest import tiny_config
from dsv4.cache.block_manager import BlockManager
from dsv4.cache.decode_group import DecodeGroup
from dsv4.cache.kv_cache import KVCache, RequestView
from dsv4.engine.engine_config import EngineConfig

CSA_LAYERS = (1, 3)  # tiny_config: swa, csa, hca, csa


def paged(num_tokens: dict[str, int]) -> tuple[KVCache, BlockManager]:
    cfg = tiny_config()
    ec = EngineConfig(max_model_len=128, block_size=16, max_num_batched_tokens=64,
                      kv_cache_memory=4 << 20)
    bm = BlockManager.from_config(cfg, ec)
    for req, n in num_tokens.items():
        assert bm.allocate(req, 0, n)
    return KVCache(cfg, bm, "cpu", torch.float32), bm


def test_request_view_builds_slots_once_per_step():
    cache, bm = paged({"other": 30, "a": 40})  # "a"'s blocks do not start at 1
    tables, bs = bm.block_tables("a"), cache.block_size
    view = RequestView(cache, tables, 0, bm.state_slot("a"), 24)  # a chunk at 24..39
    window = view.window_slots(17, 24)  # every layer's window_history(7) reads these
    assert view.window_slots(17, 24) is window
    assert window.tolist() == [tables["swa"][p // bs] * bs + p % bs for p in range(17, 24)]

    stores = [view.layer(i) for i in CSA_LAYERS]
    entries = [s.compressor.entry_slots(10)[1] for s in stores]
    entries += [s.indexer.entry_slots(10)[1] for s in stores]
    assert all(e is entries[0] for e in entries)  # main and indexer keys share csa's blocks
    per = bs // 4
    assert entries[0].tolist() == [tables["csa"][w // per] * per + w % per for w in range(10)]
    hca = view.layer(2).compressor.entry_slots(5)[1]
    assert hca.tolist() == [tables["hca"][w // 2] * 2 + w % 2 for w in range(5)]  # 16 / 8


def test_segment_writes_land_where_a_fresh_computation_puts_them():
    cache, bm = paged({"other": 30, "a": 40})
    tables, bs = bm.block_tables("a"), cache.block_size
    view = RequestView(cache, tables, 0, bm.state_slot("a"), 24)
    kv = torch.randn(1, 16, cache.config.head_dim)
    for i in range(4):
        view.layer(i).save_window(kv, kv)
    for i in range(4):
        slots = [tables["swa"][p // bs] * bs + p % bs for p in range(24, 40)]
        assert torch.equal(cache.window_flat(i)[slots], kv[0])
    entries = torch.randn(1, 4, cache.config.head_dim)  # windows 6..9 of csa
    for i in CSA_LAYERS:
        view.layer(i).compressor.append(entries)
    per = bs // 4
    slots = [tables["csa"][w // per] * per + w % per for w in range(6, 10)]
    for k in range(2):
        flat = cache.entries["csa"][k].view(-1, cache.config.head_dim)
        assert torch.equal(flat[slots], entries[0])


def test_decode_group_shares_completing_rows_across_layers():
    cache, bm = paged({"a": 20, "b": 9, "c": 16})
    reqs = ("a", "b", "c")
    group = DecodeGroup(cache, [bm.block_tables(r) for r in reqs], [0, 0, 0],
                        [bm.state_slot(r) for r in reqs], [19, 8, 15])
    csa = [group.layer(i) for i in CSA_LAYERS]
    done = [s.compressor.completing_rows(0) for s in csa] + [s.indexer.completing_rows(0)
                                                           for s in csa]
    assert all(d is done[0] for d in done)
    assert done[0].tolist() == [0, 2]  # positions 19 and 15 end a window of 4
    assert group.layer(2).compressor.completing_rows(0).tolist() == [2]  # 15 ends one of 8
    quiet = DecodeGroup(cache, [bm.block_tables("b")], [0], [bm.state_slot("b")], [8])
    assert quiet.layer(1).compressor.completing_rows(0) is None


def test_drafts_in_later_waves_advance_the_compressor_in_order_and_roll_back():
    """A row at 15 (the end of cache block 0) with drafts at 16..19 (the last completes a CSA
    window): the compressor consumes wave after wave; block 0's kept CSA state is the window
    that 15 completes, not one a draft completes later; rolling the drafts back restores the
    state the kept token left."""
    cache, bm = paged({"a": 40})
    assert cache.boundaries, "prefix caching keeps CSA state at block ends"
    tables, slot, dim = bm.block_tables("a"), bm.state_slot("a"), cache.config.head_dim
    positions = [15, 16, 17, 18, 19]
    group = DecodeGroup(cache, [tables] * 5, [0] * 5, [slot] * 5, positions, [0, 1, 2, 3, 4])
    assert group.num_waves == 5
    store = group.layer(CSA_LAYERS[0]).compressor
    width = store.kv.shape[-1]
    kv, score = torch.randn(5, width), torch.randn(5, width)
    after_first = None
    for wave in range(5):
        store.write_token(kv, score, wave)
        done = store.completing_rows(wave)
        if done is not None:
            assert done.tolist() == [wave]  # 15 and 19 complete a window
            pooled_kv, _ = store.completed_windows(done, dim)
            store.append_completed(done, pooled_kv[:, :1, :dim].squeeze(1), wave)
        if wave == 0:
            after_first = store.kv[slot].clone()
    assert torch.equal(store.kv[slot, :4], kv[1:5])  # the window 16..19 is the previous one
    kept = cache.boundaries["csa"][0][0, tables["swa"][0]]
    assert torch.equal(kept, after_first[:4, :dim])  # 12..15's rows, as 15 left them
    group.rollback({1, 2, 3, 4})
    assert torch.equal(store.kv[slot], after_first)
    group.rollback({1, 2, 3, 4})  # forgotten rows stay forgotten: nothing undone twice
    assert torch.equal(store.kv[slot], after_first)
