"""Lightning-indexer scores (vector keys, and FP4 / plain keys read in place from cache storage)
and the deterministic top-k: Triton kernels vs dsv4.model.indexer (fp32 under the interpreter)."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from dsv4.cache.kv_format import entry_format
from dsv4.kernels.indexer import indexer_scores, indexer_scores_paged, select_topk
from dsv4.model.indexer import KeySlots
from dsv4.model.indexer import indexer_scores as scores_torch
from dsv4.model.indexer import select_topk as topk_torch
from dsv4.quant import fake_quant_fp4


def _q(kernel_device, g, b=2, t=3, h=3, d=32):
    return (torch.randn(b, t, h, d, generator=g).to(kernel_device),
            torch.randn(b, t, h, generator=g).to(kernel_device))


def test_triton_indexer_scores_match_torch(kernel_device):
    g = torch.Generator().manual_seed(0)
    q, w = _q(kernel_device, g)
    keys = torch.randn(2, 21, 32, generator=g).to(kernel_device)  # 21 entries: a partial tile
    got = indexer_scores(q, keys, w)
    torch.testing.assert_close(got, scores_torch(q, keys, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["fp4", "fp32"])
def test_triton_indexer_scores_read_keys_in_place(kernel_device, cache):
    g = torch.Generator().manual_seed(1)
    q, w = _q(kernel_device, g)
    fmt = entry_format(cache, 32, 16, key=True)
    vectors = fake_quant_fp4(torch.randn(12, 32, generator=g) * 3)
    storage = fmt.encode(vectors).unsqueeze(0).to(kernel_device)  # [1, 12, 20 bytes or 32]
    slots = torch.tensor([[3, 0, 7, 11, 5], [1, 2, -1, -1, -1]], device=kernel_device)  # ragged
    got = indexer_scores_paged(q, storage, slots, w, fmt)
    keys = vectors.to(kernel_device)[slots.clamp_min(0)]
    want = scores_torch(q, keys, w)
    present = (slots >= 0).unsqueeze(1).expand_as(want)  # -1 slots: never visible, any score
    torch.testing.assert_close(got[present], want[present], rtol=1e-5, atol=1e-5)
    decode = functools.partial(fmt.decode, dtype=torch.float32) if fmt.encoded else None
    via_op = indexer_scores(q, KeySlots(storage, slots, decode), w)  # the model's form
    assert torch.equal(via_op, got)


def test_triton_topk_ties_go_to_the_lower_id(kernel_device):
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, -0.0, 3.0, 0.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -1.0, 4.0, 9.0, 9.0, 1.0, 1.0, 7.0]], device=kernel_device)
    visible = torch.ones_like(scores, dtype=torch.bool)
    visible[2, 3] = False  # an invisible best score is never chosen
    for k in (1, 3, 4, 8):
        got = select_topk(scores, visible, k)
        assert torch.equal(got, topk_torch(scores, visible, k)), k
    assert select_topk(scores, visible, 4)[0].tolist() == [1, 2, 5, 7]


def test_triton_topk_ragged_visibility_and_empty_rows(kernel_device):
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (2, 3, 37), generator=g).float().to(kernel_device)  # many ties
    counts = torch.tensor([0, 5, 37], device=kernel_device)
    visible = torch.arange(37, device=kernel_device) < counts[:, None]
    got = select_topk(scores, visible.expand(2, 3, 37), 8)
    assert torch.equal(got, topk_torch(scores, visible.expand(2, 3, 37), 8))
    assert torch.all(got[:, 0] == -1)  # nothing visible
    assert torch.all(got[:, 1, 5:] == -1)  # fewer visible than k
