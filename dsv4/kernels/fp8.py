"""Bit-exact number-format helpers for the kernels: e4m3, ue8m0, bf16 and e2m1 done with integer
bit operations instead of Triton's casts.

Why not the casts: in Triton's CPU interpreter fp32 -> e4m3 casts are wrong and do not saturate
(31.6 -> 16), fp32 -> bf16 truncates instead of rounding, and e8m0 tensors cannot be passed in.
Doing the formats by hand makes one code path exact under the interpreter and on a GPU, and equal
to torch's rounding (round to nearest, ties to even) bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = 448.0


@triton.jit
def exponent_of(x):
    """floor(log2(|x|)) of normal fp32 values, from the exponent bits (exact, unlike log2)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def pow2(e):
    """2.0 ** e for integer e in [-126, 127] (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_scale_exponent(amax, qmax: tl.constexpr, floor: tl.constexpr):
    """Exponent of the power-of-two scale that maps amax (floored) into [-qmax, qmax]:
    ceil(log2(max(amax, floor) / qmax)), taken from the bits of the quotient."""
    a = tl.maximum(amax, floor) / qmax
    bits = a.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    return tl.where((bits & 0x7FFFFF) != 0, e + 1, e)


@triton.jit
def round_half_even(y):
    """Round non-negative y to the nearest integer, ties to even."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def round_e4m3(v):
    """v (|v| <= 448 after saturation) rounded to the nearest e4m3fn value, ties to even."""
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    mag = tl.abs(v)
    e = tl.maximum(exponent_of(mag), -6)  # below 2^-6: the subnormal grid, step 2^-9
    step = pow2(e - 3)
    r = round_half_even(mag / step) * step
    # copy v's sign bit (so tiny negatives round to -0.0 as torch's cast does; `-r` of 0.0 is
    # +0.0 under the interpreter)
    sign = ((v.to(tl.int32, bitcast=True) >> 31) & 1) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_code(r):
    """The e4m3fn byte of a value already on the e4m3 grid (round_e4m3's output)."""
    mag = tl.abs(r)
    e = exponent_of(mag)
    normal = mag >= 0.015625  # 2^-6
    mant_n = ((mag / pow2(tl.maximum(e, -126)) - 1.0) * 8.0).to(tl.int32)
    code = tl.where(normal, ((e + 7) << 3) | mant_n, (mag * 512.0).to(tl.int32))
    negative = r.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 is stored as 0x80
    return (code | tl.where(negative, 128, 0)).to(tl.uint8)


@triton.jit
def e4m3_value(b):
    """fp32 value of e4m3fn bytes (b as int32)."""
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (1.0 + m * 0.125) * pow2(e - 7))
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def ue8m0_value(u):
    """fp32 multiplier 2^(u - 127) of ue8m0 bytes (u as int32, 1 <= u <= 254 in practice)."""
    return tl.where(u == 0, 5.877471754111438e-39, (u << 23).to(tl.float32, bitcast=True))


@triton.jit
def bf16_bits(x):
    """The bf16 bit pattern (int32 in [0, 65535]) of fp32 x, rounded to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16) & 0xFFFF


@triton.jit
def bf16_value(h):
    """fp32 value of bf16 bit patterns (h as int32)."""
    return (h << 16).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_value(code):
    """fp32 value of e2m1 nibbles (code as int32, bit 3 the sign)."""
    c = code & 7
    mag = tl.where(c < 4, c.to(tl.float32) * 0.5,
                   tl.where(c < 6, (c - 2).to(tl.float32), (c - 4).to(tl.float32) * 2.0))
    return tl.where((code & 8) != 0, -mag, mag)
