"""Manifold-constrained hyper-connections (mHC, architecture.md 2.3).

The residual is `hc_mult` streams [..., n, d]. Before a sublayer the streams collapse with `pre`
weights; after it the output is spread with `post` weights and the streams mix through a
Sinkhorn-normalised matrix P (destination k sums P[j, k] over sources j; P is not symmetric).
All mixing weights are computed in at least fp32; parameters live in the owning block, named as
in the checkpoint (`hc_attn_fn`, `hc_attn_base`, `hc_attn_scale`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.model.layers import rms_normalize, upcast

__all__ = ["hc_pre", "hc_post", "hc_head"]


def _mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    normed = rms_normalize(x.flatten(-2), eps)
    return F.linear(normed, fn.to(normed.dtype))


def _collapse(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j: pre [..., n], x [..., n, d] -> [..., d] in x's dtype."""
    return torch.matmul(pre.unsqueeze(-2), upcast(x)).squeeze(-2).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax, then alternate column / row normalisation (ending on columns).

    logits [..., n, n] (source, destination). The work runs on an [n, n, tokens] copy, tokens
    padded to a multiple of 16: each of the ~120 tiny reductions then streams over the token
    axis (4x faster for a 4K-token prefill than reducing over a trailing size-4 axis), and
    every token takes the same vectorised path whatever the batch size, so a token's result
    does not depend on what it is batched with."""
    flat = logits.flatten(0, -3)
    tokens = flat.shape[0]
    p = F.pad(flat.permute(1, 2, 0), (0, -tokens % 16)).softmax(1)
    e = p.new_tensor(eps)  # a tensor, not a Python float: ~2 us less per add at decode sizes
    p.add_(e).div_(p.sum(0, keepdim=True).add_(e))
    for _ in range(iters - 1):
        p.div_(p.sum(1, keepdim=True).add_(e))
        p.div_(p.sum(0, keepdim=True).add_(e))
    return p[..., :tokens].permute(2, 0, 1).contiguous().view(logits.shape)


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
    return _collapse(pre, x), post, comb


def hc_post(y: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j P[j, k] * X_j."""
    dtype, n, d = residual.dtype, *residual.shape[-2:]
    out = post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2)  # [..., n, d], the only new tensor
    # accumulate the mix into it; out= rather than baddbmm_, which FLOP counters do not see
    flat = out.view(-1, n, d)
    torch.baddbmm(flat, comb.to(dtype).transpose(-1, -2).reshape(-1, n, n),
                  residual.reshape(-1, n, d), out=flat)
    return out


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse of the streams (no Sinkhorn)."""
    pre = torch.sigmoid(_mixes(x, fn, norm_eps) * scale + base) + hc_eps
    return _collapse(pre, x)
