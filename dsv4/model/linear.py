"""Linear: a weight kept in checkpoint precision, dequantized per matmul.

Formats: "fp8" (e4m3 [out, in] + block-128 scale), "fp4" (int8-packed e2m1 [out, in/2] + per-32
ue8m0 scale) and "dense" (a plain float weight). Keeping the release's bytes in memory is what lets
a V4-Flash fit in about its on-disk size; the price is a dequantization per call, which is the
place where fused FP8/FP4 GEMM kernels plug in later. Attribute names follow the checkpoint
(`weight`, `scale`) so loading is a plain name map.

A tensor-parallel rank holds one part of a stored weight: `shard=(dim, parts, index)` says which
(part `index` of `parts` equal parts along `dim` of the stored weight, and of its scale, which
dsv4.distributed.ParallelConfig.check keeps on block boundaries). The loader reads just that part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.ops import OPS
from dsv4.quant import dequant_fp4, dequant_fp8

__all__ = ["Linear", "FORMAT_DTYPES", "Shard", "split", "fp8_linear"]

FORMAT_DTYPES = {"fp8": torch.float8_e4m3fn, "fp4": torch.int8}

# (dim, parts, index): part `index` of `parts` equal parts along `dim` of a stored tensor
Shard = tuple[int, int, int]


def split(dim: int, parts: int, index: int) -> Shard | None:
    """Part `index` of `parts` along `dim` (None: one part, the tensor is whole)."""
    return (dim, parts, index) if parts > 1 else None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ the block-scaled FP8 weight [out, in]^T, in x's dtype (the `fp8_linear`
    op's reference: dequantize, then one matmul)."""
    return F.linear(x, dequant_fp8(weight, scale, x.dtype))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str = "dense",
                 scale_dtype: torch.dtype = torch.float8_e8m0fnu, shard: Shard | None = None
                 ) -> None:
        """in_features / out_features: this rank's part (the stored weight's, unsharded)."""
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        # what the loader slices from the stored tensors (read by dsv4.model.loader)
        self.shards = {"weight": shard, "scale": shard}
        if fmt == "fp8":
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                requires_grad=False)
            shape = (-(-out_features // 128), -(-in_features // 128))
            self.scale = nn.Parameter(torch.empty(shape, dtype=scale_dtype), requires_grad=False)
        elif fmt == "fp4":
            if in_features % 32:
                raise ValueError(f"FP4 linear needs in_features % 32 == 0, got {in_features}")
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features // 2, dtype=torch.int8), requires_grad=False)
            self.scale = nn.Parameter(
                torch.empty(out_features, in_features // 32, dtype=torch.float8_e8m0fnu),
                requires_grad=False)
        elif fmt == "dense":
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.register_parameter("scale", None)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.fmt == "dense":
            return self.weight.to(dtype)
        return _dequantize(self.weight, self.scale, self.fmt, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp8":
            return OPS.fp8_linear(x, self.weight, self.scale)
        return F.linear(x, self.dense_weight(x.dtype))

    def densify(self, dtype: torch.dtype) -> None:
        """Expand the weight once to `dtype` (the load-time `dtype=` option)."""
        self.weight = nn.Parameter(self.dense_weight(dtype), requires_grad=False)
        self.scale = None
        self.fmt = "dense"

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype
                ) -> torch.Tensor:
    return (dequant_fp8 if fmt == "fp8" else dequant_fp4)(weight, scale, dtype)


def run_dequantize_eagerly() -> None:
    """Keep the dequantization eager inside compiled code (inductor takes no e8m0 input).
    Called when a compiled decode step is built (DecodeGraphs), not at import: wrapping it at
    import would import torch._dynamo (~2 s) with every use of dsv4."""
    global _dequantize
    if not getattr(_dequantize, "_dsv4_eager", False):
        _dequantize = torch.compiler.disable(_dequantize)
        _dequantize._dsv4_eager = True
