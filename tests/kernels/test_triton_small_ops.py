"""RMSNorm, RoPE, KV FP8 rounding and the fp8 cache write: Triton kernels vs the torch code.

Under the interpreter (CPU) everything runs in fp32: the interpreter's fp32 -> bf16 cast
truncates, so a bf16 comparison would test the interpreter, not the kernel."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dsv4.cache.kv_format import entry_format
from dsv4.cache.kv_format import write_entries as write_torch
from dsv4.kernels.kv_cache import fake_quant_kv, write_entries
from dsv4.kernels.rms_norm import rms_norm
from dsv4.kernels.rope import apply_rope
from dsv4.model.layers import apply_rope as rope_torch
from dsv4.model.layers import rms_norm as rms_torch
from dsv4.quant import fake_quant_kv as fq_torch


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 48), (1, 1, 1, 40)])
def test_triton_rms_norm_matches_torch(kernel_device, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(kernel_device)
    w = torch.rand(shape[-1], generator=g).to(kernel_device) + 0.5
    got = rms_norm(x, w, 1e-6)
    # one fp32 sum in another order than torch's: a few ulps
    torch.testing.assert_close(got, rms_torch(x, w, 1e-6), rtol=2e-6, atol=1e-6)
    assert got.shape == x.shape and got.dtype == x.dtype


def test_triton_rms_norm_empty_and_fp64_fall_back(kernel_device):
    x = torch.randn(0, 16, device=kernel_device)
    assert rms_norm(x, torch.ones(16, device=kernel_device), 1e-6).shape == (0, 16)
    x64 = torch.randn(2, 16, dtype=torch.float64, device=kernel_device)
    w = torch.ones(16, device=kernel_device)
    assert torch.equal(rms_norm(x64, w, 1e-6), rms_torch(x64, w, 1e-6))


@pytest.mark.parametrize("inverse", [False, True])
def test_triton_rope_matches_torch_for_every_broadcast(kernel_device, inverse):
    g = torch.Generator().manual_seed(1)
    pos = torch.tensor([0, 3, 7, 100])
    freqs = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    ang = pos.float()[:, None] * freqs
    cos, sin = ang.cos().to(kernel_device), ang.sin().to(kernel_device)
    q = torch.randn(2, 4, 3, 40, generator=g).to(kernel_device)  # [B, T, H, D]: cos [T, 1, r/2]
    kv = torch.randn(2, 4, 40, generator=g).to(kernel_device)  # [B, T, D]: cos [T, r/2]
    # all dims rotated, cos [1, T, 1, r/2]
    qi = torch.randn(1, 4, 2, 16, generator=g).to(kernel_device)
    for x, c, s in ((q, cos[:, None], sin[:, None]), (kv, cos, sin),
                    (qi, cos[None, :, None], sin[None, :, None])):
        got = apply_rope(x, c, s, inverse)
        # same fp32 operations in the same order: exact under the interpreter (an FMA on a
        # GPU may differ in the last bit)
        torch.testing.assert_close(got, rope_torch(x, c, s, inverse), rtol=1e-6, atol=1e-6)


def _kv(kernel_device, rows=5, dim=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[0, :8] = torch.tensor([448.0, -448.0, 500.0, 1e-9, 0.0, 2.0**-8, 3 * 2.0**-10, 31.6])
    x[1] = 0.0  # an all-zero row: the scale floor
    return x.to(kernel_device)


@pytest.mark.parametrize("dim,rope", [(64, 16), (200, 64)])
def test_triton_fake_quant_kv_is_exact(kernel_device, dim, rope):
    x = _kv(kernel_device, dim=dim)
    got = fake_quant_kv(x, rope)
    # every step is an exact fp32 / power-of-two operation: bit-identical to torch's e4m3 cast
    assert torch.equal(got, fq_torch(x, rope))


@pytest.mark.parametrize("dim,rope", [(64, 16), (512, 64)])
def test_triton_fp8_cache_write_is_byte_exact(kernel_device, dim, rope):
    fmt = entry_format("fp8", dim, rope)
    if dim == 512:
        assert fmt.nbytes == 584  # V4's entry
    x = _kv(kernel_device, rows=4, dim=dim)
    slots = torch.tensor([6, 0, 3, 5], device=kernel_device)  # scattered, out of order
    want = torch.full((8, fmt.nbytes), 7, dtype=torch.uint8, device=kernel_device)
    got = want.clone()
    write_torch(want, slots, x, fmt)
    write_entries(got, slots, x, fmt)
    assert torch.equal(got, want)  # written rows byte-equal, untouched rows untouched
    want_values = fq_torch(x, rope)
    want_values[:, -rope:] = want_values[:, -rope:].bfloat16().float()  # rope dims stored as bf16
    assert torch.equal(fmt.decode(got[slots], torch.float32), want_values)


def test_triton_plain_cache_write_falls_back(kernel_device):
    fmt = entry_format("fp32", 32, 16)
    flat = torch.zeros(4, 32, device=kernel_device)
    x = torch.randn(2, 32, device=kernel_device)
    write_entries(flat, torch.tensor([3, 1], device=kernel_device), x, fmt)
    assert torch.equal(flat[3], x[0]) and torch.equal(flat[1], x[1])
