"""KV FP8 rounding and the cache write of dsv4's 584-byte entry (kv_format's "fp8_main").

fake_quant_kv: the reference's QAT rounding, nope dims to e4m3 with one power-of-two scale per 64,
rope dims untouched. write_entries: the same rounding, encoded straight into the entry bytes
(e4m3 nope, bf16 rope, ue8m0 scales, zero padding) at the given rows of the flat cache storage;
plain (fp32 / bf16) and key formats go through the torch reference. All number formats are done
with bit operations (dsv4.kernels.fp8: the interpreter's fp8 / bf16 casts are wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.cache.kv_format import EntryFormat
from dsv4.cache.kv_format import write_entries as write_entries_torch
from dsv4.kernels.common import supported
from dsv4.kernels.fp8 import bf16_bits, e4m3_code, pow2, pow2_scale_exponent, round_e4m3
from dsv4.quant import fake_quant_kv as fake_quant_kv_torch

__all__ = ["fake_quant_kv", "write_entries"]


@triton.jit
def _quant_blocks(x_ptr, base, nope, NB: tl.constexpr):
    """Row base's nope dims as [NB, 64] blocks: (e4m3-rounded values / scale, scale exponent)."""
    blk = tl.arange(0, NB)[:, None]
    col = blk * 64 + tl.arange(0, 64)[None, :]
    mask = col < nope
    v = tl.load(x_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
    e = pow2_scale_exponent(tl.max(tl.abs(v), axis=1), 448.0, 1e-4)  # [NB]
    q = round_e4m3(v / pow2(e)[:, None])
    return q, e, col, mask


@triton.jit
def _fake_quant_kv_kernel(x_ptr, out_ptr, dim, nope, NB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * dim
    q, e, col, mask = _quant_blocks(x_ptr, base, nope, NB)
    tl.store(out_ptr + base + col, (q * pow2(e)[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)
    cols = nope + tl.arange(0, BLOCK)
    rope = cols < dim
    tl.store(out_ptr + base + cols, tl.load(x_ptr + base + cols, mask=rope), mask=rope)


@triton.jit
def _write_fp8_kernel(x_ptr, slot_ptr, out_ptr, dim, nope, nbytes, NB: tl.constexpr,
                      ROPE: tl.constexpr, PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * dim
    dst = tl.load(slot_ptr + row) * nbytes
    q, e, col, mask = _quant_blocks(x_ptr, base, nope, NB)
    tl.store(out_ptr + dst + col, e4m3_code(q), mask=mask)
    r = tl.arange(0, ROPE)
    h = bf16_bits(tl.load(x_ptr + base + nope + r).to(tl.float32))  # little-endian bf16
    tl.store(out_ptr + dst + nope + 2 * r, (h & 0xFF).to(tl.uint8))
    tl.store(out_ptr + dst + nope + 2 * r + 1, (h >> 8).to(tl.uint8))
    sb = nope + 2 * ROPE
    nb = (nope + 63) // 64
    blk = tl.arange(0, NB)
    tl.store(out_ptr + dst + sb + blk, tl.minimum(tl.maximum(e + 127, 0), 254).to(tl.uint8),
             mask=blk < nb)
    p = sb + nb + tl.arange(0, PAD)
    tl.store(out_ptr + dst + p, tl.zeros([PAD], tl.uint8), mask=p < nbytes)


def _geometry(dim: int, rope_dim: int) -> tuple[int, int]:
    nope = dim - rope_dim
    return nope, triton.next_power_of_2(max(1, -(-nope // 64)))


def fake_quant_kv(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    dim = x.shape[-1]
    if not supported(x) or dim == rope_dim:
        return fake_quant_kv_torch(x, rope_dim)
    nope, nb = _geometry(dim, rope_dim)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    _fake_quant_kv_kernel[(xc.numel() // dim,)](xc, out, dim, nope, NB=nb,
                                                BLOCK=triton.next_power_of_2(max(rope_dim, 1)))
    return out


def write_entries(flat: torch.Tensor, slots: torch.Tensor, x: torch.Tensor,
                  fmt: EntryFormat) -> None:
    rope = fmt.rope_dim
    if (fmt.kind != "fp8_main" or not supported(x) or rope & (rope - 1) or rope == 0
            or flat.device != x.device or not flat.is_contiguous()):
        write_entries_torch(flat, slots, x, fmt)
        return
    nope, nb = _geometry(fmt.dim, rope)
    pad = fmt.nbytes - (nope + 2 * rope + -(-nope // 64))
    xc = x.reshape(-1, fmt.dim).contiguous()
    _write_fp8_kernel[(xc.shape[0],)](xc, slots.contiguous(), flat, fmt.dim, nope, fmt.nbytes,
                                      NB=nb, ROPE=rope, PAD=triton.next_power_of_2(max(pad, 1)))
