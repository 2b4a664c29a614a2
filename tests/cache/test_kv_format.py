"""Cache entry byte formats: sizes as in architecture.md 3.3, QAT-rounded values survive."""

from __future__ import annotations

import torch

from dsv4.cache.kv_format import entry_format
from dsv4.cache.spec import entry_bytes, index_entry_bytes
from dsv4.quant import fake_quant_fp4, fake_quant_fp8, hadamard


def test_sizes_match_the_spec():
    assert entry_format("fp8", 512, 64).nbytes == entry_bytes("fp8", 512, 64) == 584
    assert entry_format("fp4", 128, 64, key=True).nbytes == index_entry_bytes("fp4", 128) == 68
    assert entry_format("fp8", 128, 64, key=True).nbytes == index_entry_bytes("fp8", 128) == 132
    assert entry_format("fp8", 64, 16).nbytes == entry_bytes("fp8", 64, 16)


def test_qat_rounded_entries_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 512, generator=g) * 3
    x = torch.cat([fake_quant_fp8(x[:, :448]), x[:, 448:].bfloat16().float()], dim=1)
    fmt = entry_format("fp8", 512, 64)
    raw = fmt.encode(x)
    assert raw.dtype == torch.uint8 and raw.shape == (50, 584)
    assert torch.equal(fmt.decode(raw, torch.float32), x)
    keys = fake_quant_fp4(hadamard(torch.randn(20, 128, generator=g)))
    kfmt = entry_format("fp4", 128, 64, key=True)
    assert torch.equal(kfmt.decode(kfmt.encode(keys), torch.float32), keys)


def test_unrounded_values_stay_close():
    x = torch.randn(8, 64)
    for key, dtype in ((False, "fp8"), (True, "fp8"), (True, "fp4")):
        fmt = entry_format(dtype, 64, 16, key=key)
        y = fmt.decode(fmt.encode(x), torch.float32)
        assert y.shape == x.shape
        assert (y - x).abs().max() <= (0.3 if dtype == "fp4" else 0.08) * x.abs().max()
