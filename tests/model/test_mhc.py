"""mHC mixing: Sinkhorn's constraints, the formulas of architecture.md 2.3, and Sinkhorn and
stream-mixing results per token that do not depend on how many tokens share the call (decode
rows vs a prefill chunk). The fp32 linear maps around them are BLAS calls whose rounding may
depend on the row count; those are covered by the decode-vs-forward tolerance tests."""

from __future__ import annotations

import torch

from dsv4.model.mhc import hc_post, hc_pre, sinkhorn

N, D = 4, 32


def _reference_sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    p = m.softmax(-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def test_sinkhorn_matches_the_formula_and_ends_column_stochastic():
    m = torch.randn(3, 37, N, N, generator=torch.Generator().manual_seed(0)) * 3
    p = sinkhorn(m, 20, 1e-6)
    assert p.shape == m.shape and p.is_contiguous()
    torch.testing.assert_close(p, _reference_sinkhorn(m, 20, 1e-6), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 37, N), rtol=0, atol=1e-5)


def test_sinkhorn_and_mixing_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(1)
    t = 37  # not a multiple of the padding, so both padded and unpadded tails occur
    m = torch.randn(1, t, N, N, generator=g) * 3
    comb = sinkhorn(m, 20, 1e-6)
    assert torch.equal(comb, torch.cat([sinkhorn(m[:, i:i + 1], 20, 1e-6) for i in range(t)], 1))

    x = torch.randn(1, t, N, D, generator=g)
    fn = torch.randn((2 + N) * N, N * D, generator=g) * 0.1
    scale, base = torch.rand(3, generator=g), torch.randn((2 + N) * N, generator=g)
    _, post, comb = hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    y = torch.randn(1, t, D, generator=g)
    mixed = hc_post(y, x, post, comb)
    expected = post.unsqueeze(-1) * y.unsqueeze(-2) + torch.einsum("btjk,btjd->btkd", comb, x)
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)
    per_row = torch.cat([hc_post(y[:, i:i + 1], x[:, i:i + 1], post[:, i:i + 1],
                                 comb[:, i:i + 1]) for i in range(t)], dim=1)
    assert torch.equal(mixed, per_row)
