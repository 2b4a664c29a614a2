"""The compressor's window pooling and mHC pre/post (Sinkhorn): Triton kernels vs torch (fp32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.kernels.mhc import hc_post, hc_pre
from dsv4.kernels.window_pool import window_pool
from dsv4.model.compressor import window_pool as pool_torch
from dsv4.model.mhc import hc_post as post_torch
from dsv4.model.mhc import hc_pre as pre_torch


@pytest.mark.parametrize("shape", [(2, 3, 8, 40), (5, 128, 24), (1, 1, 4, 200)])
def test_triton_window_pool_matches_torch(kernel_device, shape):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(shape, generator=g).to(kernel_device)
    score = (torch.randn(shape, generator=g) * 3).to(kernel_device)
    if shape[-2] == 8:  # CSA's first window: no previous one, its half is -inf / 0
        score[0, 0, :4] = float("-inf")
        kv[0, 0, :4] = 0.0
    got = window_pool(kv, score)
    # softmax normalised before (torch) or after (kernel) the weighted sum: a few ulps
    torch.testing.assert_close(got, pool_torch(kv, score), rtol=1e-5, atol=1e-6)
    assert got.shape == shape[:-2] + shape[-1:]


def _hc(kernel_device, tokens=(2, 3), n=4, d=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, n, d, generator=g).to(kernel_device)
    fn = (torch.randn((2 + n) * n, n * d, generator=g) * 0.05).to(kernel_device)
    scale = torch.tensor([1.0, 0.5, 2.0]).to(kernel_device)
    base = (torch.randn((2 + n) * n, generator=g) * 0.1).to(kernel_device)
    return x, fn, scale, base


@pytest.mark.parametrize("iters,d", [(1, 48), (5, 48), (20, 300)])
def test_triton_hc_pre_matches_torch(kernel_device, iters, d):
    x, fn, scale, base = _hc(kernel_device, d=d)
    got = hc_pre(x, fn, scale, base, iters, 1e-6, 1e-6)
    want = pre_torch(x, fn, scale, base, iters, 1e-6, 1e-6)
    # the RMS factor is applied after the dot products (reference: before): ~1e-6 relative,
    # carried through sigmoid and Sinkhorn
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    comb = got[2]
    torch.testing.assert_close(comb.sum(-2), torch.ones_like(comb.sum(-2)), rtol=0, atol=1e-3)


def test_triton_hc_post_matches_torch(kernel_device):
    x, _, _, _ = _hc(kernel_device, tokens=(3,), d=72)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(3, 72, generator=g).to(kernel_device)
    post = torch.rand(3, 4, generator=g).to(kernel_device) * 2
    comb = torch.rand(3, 4, 4, generator=g).to(kernel_device)  # not symmetric: checks the direction
    got = hc_post(y, x, post, comb)
    torch.testing.assert_close(got, post_torch(y, x, post, comb), rtol=1e-5, atol=1e-6)
