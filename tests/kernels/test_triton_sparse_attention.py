"""Sparse attention with the sink: the Triton kernel vs dsv4.model.attention.sparse_attention,
for every source mix the attention builds (window only; window + all compressed entries; window
+ top-k entries read in place from plain or 584-byte-style fp8 cache storage). fp32 under the
interpreter (its bf16 tl.dot is broken); tolerance: the online softmax sums in another order."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from dsv4.cache.kv_format import entry_format
from dsv4.kernels.sparse_attention import sparse_attention
from dsv4.model.attention import Gathered, Shared
from dsv4.model.attention import sparse_attention as attention_torch
from dsv4.quant import fake_quant_kv

B, T, H, D, ROPE = 2, 3, 3, 64, 16


def _window(kernel_device, g, keys=20):
    """Window keys [B, 20, D] (crosses the kernel's 16-key tile) with a causal band; query 0 of
    row 1 sees nothing (an empty row: output 0)."""
    k = torch.randn(B, keys, D, generator=g)
    pos = torch.arange(keys)
    q_pos = torch.tensor([keys - 3, keys - 2, keys - 1])
    vis = ((pos <= q_pos[:, None]) & (pos > q_pos[:, None] - 8)).unsqueeze(0).repeat(B, 1, 1)
    vis[1, 0] = False
    return Shared(k.to(kernel_device), vis.to(kernel_device))


def _check(q, sources, sink, kernel_device):
    got = sparse_attention(q, sources, sink, D**-0.5)
    want = attention_torch(q, sources, sink, D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


def _inputs(kernel_device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(kernel_device)
    sink = torch.randn(H, generator=g).to(kernel_device)
    return g, q, sink


def test_triton_sparse_attention_window_only(kernel_device):
    g, q, sink = _inputs(kernel_device, 0)
    got = _check(q, [_window(kernel_device, g)], sink, kernel_device)
    assert torch.all(got[1, 0] == 0)  # no visible key: the sink takes all the weight


def test_triton_sparse_attention_window_plus_dense_entries(kernel_device):
    g, q, sink = _inputs(kernel_device, 1)
    entries = torch.randn(B, 7, D, generator=g).to(kernel_device)
    visible = (torch.arange(7) < torch.tensor([0, 3, 7])[:, None]).unsqueeze(0).to(kernel_device)
    _check(q, [_window(kernel_device, g), Shared(entries, visible)], sink, kernel_device)


@pytest.mark.parametrize("pool", ["shared", "per_row"])
def test_triton_sparse_attention_topk_plain_storage(kernel_device, pool):
    g, q, sink = _inputs(kernel_device, 2)
    rows = 1 if pool == "shared" else B
    storage = torch.randn(rows, 40, D, generator=g).to(kernel_device)
    idx = torch.randint(0, 40, (B, T, 18), generator=g)  # 18 > one tile
    idx[0, 0, 5:] = -1  # ragged: fewer entries than k
    idx[1, 2] = -1  # none at all
    src = Gathered(storage, idx.to(kernel_device))
    _check(q, [_window(kernel_device, g), src], sink, kernel_device)


def test_triton_sparse_attention_topk_fp8_storage_read_in_place(kernel_device):
    g, q, sink = _inputs(kernel_device, 3)
    fmt = entry_format("fp8", D, ROPE)
    vectors = fake_quant_kv(torch.randn(30, D, generator=g) * 4, ROPE)
    storage = fmt.encode(vectors).unsqueeze(0).to(kernel_device)  # [1, 30, nbytes] bytes
    decode = functools.partial(fmt.decode, dtype=torch.float32)  # as KVCache.decoder gives
    idx = torch.randint(0, 30, (B, T, 5), generator=g)
    idx[0, 1, 2:] = -1
    src = Gathered(storage, idx.to(kernel_device), decode)
    got = _check(q, [_window(kernel_device, g), src], sink, kernel_device)
    assert got.shape == q.shape


def test_triton_sparse_attention_unknown_decoder_falls_back(kernel_device):
    g, q, sink = _inputs(kernel_device, 4)
    storage = torch.randn(1, 10, D, generator=g).to(kernel_device)
    idx = torch.randint(0, 10, (B, T, 4), generator=g).to(kernel_device)
    src = Gathered(storage, idx, lambda rows: rows * 2)  # a decoder the kernel cannot read
    _check(q, [_window(kernel_device, g), src], sink, kernel_device)


def test_triton_sparse_attention_window_and_entries_both_in_place(kernel_device):
    """The batched decode path with the Triton attention: the window and all compressed entries
    are cache slots too (fp8 window entries, plain compressed ones)."""
    g, q, sink = _inputs(kernel_device, 5)
    fmt = entry_format("fp8", D, ROPE)
    vectors = fake_quant_kv(torch.randn(24, D, generator=g), ROPE)
    window = fmt.encode(vectors).unsqueeze(0).to(kernel_device)
    decode = functools.partial(fmt.decode, dtype=torch.float32)
    win_slots = torch.randint(0, 24, (B, 1, 10), generator=g)
    win_slots[0, 0, :4] = -1  # positions before the sequence start
    entries = torch.randn(1, 9, D, generator=g).to(kernel_device)
    entry_slots = torch.tensor([[[0, 1, 2, -1]], [[5, 6, 7, 8]]])
    q1 = q[:, :1]  # one query per row, as decode rows are
    _check(q1, [Gathered(window, win_slots.to(kernel_device), decode),
                Gathered(entries, entry_slots.to(kernel_device))], sink, kernel_device)
