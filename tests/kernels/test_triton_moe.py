"""FP4-expert grouped MoE: the Triton kernels vs the per-expert torch loop (fp32, interpreter)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

pytest.importorskip("triton")

from dsv4.kernels.moe import routed_experts
from dsv4.model.moe import MoE
from dsv4.model.moe import routed_experts as experts_torch
from dsv4.quant import quant_fp4_rows


def _moe(device, limit=10.0):
    cfg = tiny_config(expert_dtype="fp4", n_routed_experts=8, moe_intermediate_size=96,
                      hidden_size=64, swiglu_limit=limit)
    moe = MoE(cfg, is_hash=False)
    g = torch.Generator().manual_seed(0)
    for expert in moe.experts.values():
        for lin in (expert.w1, expert.w2, expert.w3):
            w = torch.randn(lin.out_features, lin.in_features, generator=g) * 0.5
            packed, scale = quant_fp4_rows(w)
            lin.weight.data, lin.scale.data = packed, scale
    return moe.to(device)


@pytest.mark.parametrize("limit", [10.0, 0.5, 0.0])
def test_triton_grouped_fp4_moe_matches_expert_loop(kernel_device, limit):
    moe = _moe(kernel_device, limit)
    g = torch.Generator().manual_seed(1)
    n, k = 21, 2  # 21 tokens: experts get ragged counts, one tile boundary (16) crossed
    x = torch.randn(n, 64, generator=g).to(kernel_device)
    ids = torch.randint(0, 8, (n, k), generator=g)
    ids[:18, 0] = 3  # one expert with more than a tile; experts 5-7 may get none
    ids[:, 1] = torch.where(ids[:, 1] == 3, 4, ids[:, 1])  # a token never picks one twice
    weights = torch.rand(n, k, generator=g).to(kernel_device)
    ids = ids.to(kernel_device)
    got = routed_experts(moe.experts, 8, x, weights, ids)
    want = experts_torch(moe.experts, 8, x, weights, ids)
    # exact FP4 products, fp32 sums in 64-wide tiles vs one matmul per expert: 1e-5 of the
    # largest output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_triton_grouped_moe_skips_experts_held_elsewhere(kernel_device):
    moe = _moe(kernel_device)
    for key in ("1", "6"):  # as an expert-parallel rank: these live on another rank
        del moe.experts[key]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 64, generator=g).to(kernel_device)
    ids = torch.tensor([[1, 6], [0, 1], [2, 3], [6, 7], [4, 5], [0, 2]]).to(kernel_device)
    weights = torch.rand(6, 2, generator=g).to(kernel_device)
    got = routed_experts(moe.experts, 8, x, weights, ids)
    want = experts_torch(moe.experts, 8, x, weights, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.all(got[0] == 0)  # both picks elsewhere
