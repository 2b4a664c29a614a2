"""Low-precision formats of the V4 checkpoints and of the reference's quantization-aware path.

Storage (architecture.md 4.3): FP8 e4m3 weights with one scale per 128x128 block, FP4 e2m1 experts
packed two per int8 byte (low nibble first) with one ue8m0 scale per 32 inputs. A ue8m0 byte u is
the power of two 2^(u-127). Emulation (architecture.md 2.9): the reference rounds window / compressed
KV to FP8 with per-64 power-of-two scales and indexer queries / keys to FP4 with per-32 scales after
a Hadamard rotation. Every function here is pure torch and device-agnostic (meta included).
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX", "FP4_MAX", "FP4_VALUES", "ue8m0_to_float", "float_to_ue8m0",
    "dequant_fp8", "dequant_fp4", "quant_fp8_blocks", "quant_fp4_rows",
    "fake_quant_fp8", "fake_quant_fp4", "fake_quant_kv", "round_to_fp4", "hadamard",
    "pow2_scale",
]

FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 magnitudes by 3-bit code; bit 3 of a nibble is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# 3-bit code by 2*|value| (0, 1, 2, 3, 4, 6, 8, 12); other slots are never indexed
_CODE_OF_TWICE_MAG = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], device="cpu")


def ue8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Scale tensor (float8_e8m0fnu, uint8 bytes or any float) -> float32 multipliers."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        u = scale.view(torch.uint8).to(torch.int32)
        out = torch.exp2((u - 127).to(torch.float32))
        return torch.where(u == 255, torch.full_like(out, float("nan")), out)
    return scale.float()


def float_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales -> float8_e8m0fnu bytes (exact for powers of two)."""
    exp = torch.log2(scale.float()).round().to(torch.int32) + 127
    return exp.clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    s = scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return s[..., :rows, :cols]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                block: int = 128) -> torch.Tensor:
    """FP8 e4m3 weight [..., out, in] with block scales [..., ceil(out/b), ceil(in/b)]."""
    rows, cols = weight.shape[-2:]
    work = torch.promote_types(dtype, torch.float32)  # float64 output: no fp32 overflow
    s = _expand_blocks(ue8m0_to_float(scale).to(work), rows, cols, block, block)
    return (weight.to(work) * s).to(dtype)


def _fp4_table(device: torch.device) -> torch.Tensor:
    mags = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])  # index = full 4-bit code


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                block: int = 32) -> torch.Tensor:
    """FP4 e2m1 weight packed as int8 [..., out, in/2] (low nibble = even column) with per-32
    scales [..., out, in/32] -> dense [..., out, in]."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).long()
    work = torch.promote_types(dtype, torch.float32)
    values = _fp4_table(packed.device).to(work)[codes]
    s = ue8m0_to_float(scale).to(work).repeat_interleave(block, dim=-1)[..., : values.shape[-1]]
    return (values * s).to(dtype)


def pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """The power-of-two (ue8m0) scale that maps amax (floored) into [-qmax, qmax]."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(floor) / qmax)))


def _blocked(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (-1, block)), n


def fake_quant_fp8(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round x to FP8 e4m3 with one power-of-two scale per `block` values along the last dim."""
    xb, n = _blocked(x.float(), block)
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP8_MAX, 1e-4)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2)[..., :n].to(x.dtype)


def fake_quant_kv(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The reference's KV rounding: FP8 (per-64 power-of-two scales) on the leading nope dims,
    the trailing rope dims untouched."""
    nope = x.shape[-1] - rope_dim
    return torch.cat([fake_quant_fp8(x[..., :nope]), x[..., nope:]], dim=-1)


def round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value, ties to the even code; |x| must be <= 6.

    The grid has step 0.5 below 2, step 1 in [2, 4) and step 2 in [4, 6]; torch.round rounds
    half to even, which within each step region is the even code."""
    mag = x.abs().float()
    val = torch.where(mag < 2, torch.round(mag * 2) / 2,
                      torch.where(mag < 4, torch.round(mag), 2 * torch.round(mag / 2)))
    return torch.copysign(val, x.float())


def fake_quant_fp4(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Round x to FP4 e2m1 with one power-of-two (e8m0) scale per `block` values."""
    xb, n = _blocked(x.float(), block)
    scale = pow2_scale(xb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0**-126)
    q = round_to_fp4((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2)[..., :n].to(x.dtype)


def quant_fp8_blocks(w: torch.Tensor, block: int = 128, ue8m0: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [out, in] -> (e4m3 [out, in], scales [ceil(out/b), ceil(in/b)]) as in the release."""
    rows, cols = w.shape
    pr, pc = (-rows) % block, (-cols) % block
    wp = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    blocks = wp.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [R, b, C, b]
    amax = blocks.abs().amax(dim=(1, 3))
    if ue8m0:
        scale = pow2_scale(amax, FP8_MAX, 1e-4)
    else:
        scale = amax.clamp_min(1e-4) / FP8_MAX
    s = _expand_blocks(scale, rows, cols, block, block)
    q = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, (float_to_ue8m0(scale) if ue8m0 else scale.float())


def quant_fp4_rows(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [out, in] -> (packed int8 [out, in/2], ue8m0 scales [out, in/32]) as in the release."""
    rows, cols = w.shape
    if cols % block:
        raise ValueError(f"FP4 weights need in_features divisible by {block}, got {cols}")
    wb = w.float().unflatten(-1, (-1, block))
    scale = pow2_scale(wb.abs().amax(-1, keepdim=True), FP4_MAX, FP4_MAX * 2.0**-126)
    q = round_to_fp4((wb / scale).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
    code = _CODE_OF_TWICE_MAG.to(w.device)[(q.abs() * 2).long()]
    code = code + 8 * (q < 0).long()  # -0 is stored as +0
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, float_to_ue8m0(scale.squeeze(-1))


_HADAMARD: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard rotation (Sylvester order, scale n^-1/2) of the last dim."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got {n}")
    key = (n, x.device, x.dtype)
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float32)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = (h * n**-0.5).to(device=x.device, dtype=x.dtype)
        _HADAMARD[key] = h
    return x @ h
