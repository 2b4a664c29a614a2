"""Manifold-constrained hyper-connections (mHC, architecture.md 2.3).

The residual is `hc_mult` streams [..., n, d]. Before a sublayer the streams collapse with `pre`
weights; after it the output is spread with `post` weights and the streams mix through a
Sinkhorn-normalised matrix P (destination k sums P[j, k] over sources j; P is not symmetric).
All mixing weights are computed in fp32; parameters live in the owning block, named as in the
checkpoint (`hc_attn_fn`, `hc_attn_base`, `hc_attn_scale`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.model.layers import rms_normalize

__all__ = ["hc_pre", "hc_post", "hc_head"]


def _mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    return F.linear(rms_normalize(x.flatten(-2), eps), fn.float())


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax, then alternate column / row normalisation (ending on columns); in place,
    since at decode time this is ~120 tiny ops per call and allocation is half their cost."""
    p = logits.softmax(-1).add_(eps)
    p.div_(p.sum(-2, keepdim=True).add_(eps))
    for _ in range(iters - 1):
        p.div_(p.sum(-1, keepdim=True).add_(eps))
        p.div_(p.sum(-2, keepdim=True).add_(eps))
    return p


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, hc_eps: float, norm_eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., n, d] -> (collapsed [..., d], post [..., n], comb [..., n, n])."""
    n = x.shape[-2]
    z = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(z[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(z[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = z[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
    comb = sinkhorn(comb, iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
    return collapsed, post, comb


def hc_post(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j P[j, k] * X_j."""
    dtype = residual.dtype
    mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), residual)
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + mixed


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams (no Sinkhorn)."""
    pre = torch.sigmoid(_mixes(x, fn, norm_eps) * scale + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)
