"""FP8 / FP4 formats against an independent, table-driven decoding of the raw bits."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.quant import (
    dequant_fp4,
    dequant_fp8,
    fake_quant_fp4,
    fake_quant_fp8,
    float_to_ue8m0,
    hadamard,
    quant_fp4_rows,
    quant_fp8_blocks,
    round_to_fp4,
    ue8m0_to_float,
)


def e4m3_table() -> list[float]:
    """All 256 e4m3fn byte values decoded from the bit layout (s eeee mmm, bias 7)."""
    out = []
    for byte in range(256):
        s, e, m = byte >> 7, (byte >> 3) & 0xF, byte & 0x7
        if e == 0xF and m == 0x7:
            v = math.nan
        elif e == 0:
            v = m / 8 * 2.0**-6
        else:
            v = (1 + m / 8) * 2.0 ** (e - 7)
        out.append(-v if s else v)
    return out


E2M1 = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}


def ue8m0_table(u: int) -> float:
    return math.nan if u == 255 else math.ldexp(1.0, u - 127)


def test_ue8m0_edge_cases():
    raw = torch.tensor([0, 1, 126, 127, 128, 200, 254, 255], dtype=torch.uint8)
    got = ue8m0_to_float(raw.view(torch.float8_e8m0fnu))
    for u, g in zip(raw.tolist(), got.tolist()):
        want = ue8m0_table(u)
        assert (math.isnan(want) and math.isnan(g)) or g == want, (u, g, want)
    assert got[0].item() == 2.0**-127 and got[0].item() > 0  # subnormal in fp32, not zero
    assert float_to_ue8m0(torch.tensor([1.0, 0.5, 2.0**100])).view(torch.uint8).tolist() == [
        127, 126, 227]


def test_fp8_dequant_bit_exact():
    g = torch.Generator().manual_seed(1)
    rows, cols = 200, 300  # not multiples of 128: partial edge blocks
    raw = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0  # no NaN bytes
    scale_raw = torch.randint(100, 150, (2, 3), generator=g, dtype=torch.uint8)
    scale_raw[0, 0], scale_raw[1, 2] = 0, 254  # extreme scales
    got = dequant_fp8(raw.view(torch.float8_e4m3fn), scale_raw.view(torch.float8_e8m0fnu),
                      torch.float64)
    table = e4m3_table()
    for i in range(0, rows, 7):
        for j in range(0, cols, 11):
            want = table[raw[i, j]] * ue8m0_table(int(scale_raw[i // 128, j // 128]))
            assert got[i, j].item() == pytest.approx(want, rel=0, abs=0), (i, j)


def test_fp8_dequant_float32_scales():
    w = torch.tensor([[1.0, -2.0]], dtype=torch.float8_e4m3fn)
    assert dequant_fp8(w, torch.tensor([[0.25]])).tolist() == [[0.25, -0.5]]


def test_fp4_dequant_nibble_order_and_table():
    g = torch.Generator().manual_seed(2)
    rows, cols = 6, 64
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
    scale_raw = torch.tensor([[127, 130], [120, 0], [254, 127], [127, 127], [1, 2], [126, 128]],
                             dtype=torch.uint8)
    got = dequant_fp4(packed.view(torch.int8), scale_raw.view(torch.float8_e8m0fnu),
                      torch.float64)
    for i in range(rows):
        for j in range(cols):
            byte = int(packed[i, j // 2])
            nib = byte & 0xF if j % 2 == 0 else byte >> 4
            v = E2M1[nib & 7] * (-1 if nib & 8 else 1)
            want = v * ue8m0_table(int(scale_raw[i, j // 32]))
            assert got[i, j].item() == want, (i, j)


def test_quantizers_round_trip_onto_their_grids():
    w = torch.randn(130, 96) * 3
    q, s = quant_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 1)
    deq = dequant_fp8(q, s)
    assert torch.allclose(deq, w, rtol=0.07, atol=1e-3)
    assert torch.equal(dequant_fp8(*quant_fp8_blocks(deq)), deq)  # idempotent
    p, s4 = quant_fp4_rows(w)
    assert p.shape == (130, 48) and s4.shape == (130, 3)
    deq4 = dequant_fp4(p, s4)
    assert torch.equal(dequant_fp4(*quant_fp4_rows(deq4)), deq4)
    assert torch.equal(fake_quant_fp4(deq4), deq4)


def test_fp4_rounding_ties_to_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 0.2, 5.1, 6.0])
    assert round_to_fp4(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 0.0, 6.0, 6.0]


def test_fake_quant_fp8_uses_power_of_two_block_scales():
    x = torch.randn(3, 100)  # 100 = one full block of 64 plus a partial one
    y = fake_quant_fp8(x)
    assert y.shape == x.shape
    for blk in (slice(0, 64), slice(64, 100)):
        scale = 2.0 ** math.ceil(math.log2(x[0, blk].abs().max().item() / 448))
        grid = (y[0, blk] / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.equal(grid, y[0, blk])
    assert (y - x).abs().max() <= x.abs().max() / 8


def test_hadamard_is_orthonormal():
    x = torch.randn(5, 32, dtype=torch.float64)
    y = hadamard(x)
    assert torch.allclose((y * y).sum(-1), (x * x).sum(-1))
    assert torch.allclose(hadamard(y), x)  # Sylvester H/sqrt(n) is its own inverse
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(2, 24))
