"""Byte formats of cache entries (architecture.md 3.3): encode on write, decode on read.

"fp8" main / window entry (584 B for V4): the nope dims as e4m3 with one power-of-two (ue8m0)
scale per 64, the rope dims as bf16, zero padding to a multiple of 8 bytes. "fp4" indexer key
(68 B): e2m1 codes two per byte with one ue8m0 scale per 32 dims. "fp8" indexer key (132 B): e4m3
with one fp32 scale. Values already rounded by the reference's QAT emulation (FP8 per 64 with
power-of-two scales, FP4 per 32) survive these formats unchanged. Plain dtypes store as is.
"""

from __future__ import annotations

import math

import torch

from dsv4.quant import (
    FP8_MAX,
    dequant_fp4,
    float_to_ue8m0,
    pow2_scale,
    quant_fp4_rows,
    ue8m0_to_float,
)

__all__ = ["EntryFormat", "entry_format", "write_entries"]


def _pow2_scales(blocks: torch.Tensor, qmax: float) -> torch.Tensor:
    return pow2_scale(blocks.abs().amax(-1, keepdim=True), qmax, 1e-4)


class EntryFormat:
    """Codec of one entry kind; `nbytes` per entry, `storage_dtype` of the cache tensor."""

    def __init__(self, kind: str, dim: int, rope_dim: int, plain: torch.dtype | None) -> None:
        self.kind, self.dim, self.rope_dim, self.plain = kind, dim, rope_dim, plain
        if kind == "plain":
            self.nbytes, self.storage_dtype = dim, plain
        elif kind == "fp8_main":
            nope = dim - rope_dim
            raw = nope + 2 * rope_dim + math.ceil(nope / 64)
            self.nbytes, self.storage_dtype = -(-raw // 8) * 8, torch.uint8
        elif kind == "fp4_key":
            self.nbytes, self.storage_dtype = dim // 2 + math.ceil(dim / 32), torch.uint8
        elif kind == "fp8_key":
            self.nbytes, self.storage_dtype = dim + 4, torch.uint8
        else:
            raise ValueError(f"unknown entry format {kind!r}")

    @property
    def encoded(self) -> bool:
        return self.kind != "plain"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, dim] -> [n, nbytes] of storage_dtype."""
        if self.kind == "plain":
            return x.to(self.plain)
        x = x.float()
        n = x.shape[0]
        if self.kind == "fp4_key":
            packed, scales = quant_fp4_rows(x)
            return torch.cat([packed.view(torch.uint8), scales.view(torch.uint8)], dim=1)
        if self.kind == "fp8_key":
            scale = _pow2_scales(x, FP8_MAX)  # [n, 1]
            q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
            return torch.cat([q, scale.view(torch.uint8).view(n, 4)], dim=1)
        nope = self.dim - self.rope_dim
        blocks = torch.nn.functional.pad(x[:, :nope], (0, (-nope) % 64)).unflatten(-1, (-1, 64))
        scale = _pow2_scales(blocks, FP8_MAX)  # [n, nb, 1]
        q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).flatten(1)[:, :nope]
        parts = [q.to(torch.float8_e4m3fn).view(torch.uint8),
                 x[:, nope:].to(torch.bfloat16).view(torch.uint8),
                 float_to_ue8m0(scale.flatten(1)).view(torch.uint8)]
        out = torch.cat(parts, dim=1)
        return torch.nn.functional.pad(out, (0, self.nbytes - out.shape[1]))

    def decode(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[..., nbytes] -> [..., dim] of dtype."""
        if self.kind == "plain":
            return raw.to(dtype)
        lead, d = raw.shape[:-1], self.dim
        raw = raw.reshape(-1, self.nbytes)
        if self.kind == "fp4_key":
            out = dequant_fp4(raw[:, : d // 2].view(torch.int8),
                              raw[:, d // 2:].contiguous().view(torch.float8_e8m0fnu), dtype)
        elif self.kind == "fp8_key":
            scale = raw[:, d:d + 4].contiguous().view(torch.float32)
            out = (raw[:, :d].contiguous().view(torch.float8_e4m3fn).float() * scale).to(dtype)
        else:
            nope, r = d - self.rope_dim, self.rope_dim
            nb = math.ceil(nope / 64)
            q = raw[:, :nope].contiguous().view(torch.float8_e4m3fn).float()
            rope = raw[:, nope:nope + 2 * r].contiguous().view(torch.bfloat16).float()
            scale = ue8m0_to_float(raw[:, nope + 2 * r:nope + 2 * r + nb].contiguous())
            q = q * scale.repeat_interleave(64, dim=1)[:, :nope]
            out = torch.cat([q, rope], dim=1).to(dtype)
        return out.view(*lead, d)


def entry_format(cache_dtype: str, dim: int, rope_dim: int, key: bool = False) -> EntryFormat:
    """The format for a main entry (key=False) or an indexer key stored as `cache_dtype`."""
    plain = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    if cache_dtype in plain:
        return EntryFormat("plain", dim, rope_dim, plain[cache_dtype])
    if cache_dtype == "fp8":
        return EntryFormat("fp8_key" if key else "fp8_main", dim, rope_dim, None)
    if cache_dtype == "fp4" and key:
        return EntryFormat("fp4_key", dim, rope_dim, None)
    raise ValueError(f"cache dtype {cache_dtype!r} is not a {'key' if key else 'main'} format")



def write_entries(flat: torch.Tensor, slots: torch.Tensor, x: torch.Tensor,
                  fmt: EntryFormat) -> None:
    """Encode vectors x [n, dim] and store them at rows `slots` [n] of the flat cache storage
    [S, nbytes] (the `kv_write` op's reference)."""
    flat[slots] = fmt.encode(x)
