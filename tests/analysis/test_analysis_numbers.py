"""Analytic FLOP and KV numbers of dsv4.analysis against the values derived in the docs.

docs/architecture.md 3.3 and 6, docs/performance.md 2: V3.2 FP8 KV 48,068 B/token, BF16 83.9 GiB
at 1M; V4-Pro BF16 9.62 GiB; FLOPs V3.2 ~1,157 GFLOP, Pro ~26%, Flash ~12% at 1M tokens.
"""

from __future__ import annotations

import pytest

from dsv4.analysis.baselines import BASELINES
from dsv4.analysis.flops import flops_per_token, layer_flops
from dsv4.analysis.kv import entry_bytes, kv_bytes_per_sequence, kv_bytes_per_token
from dsv4.analysis.report import analyze, claim_checks
from dsv4.config import PRESETS

M = 1 << 20


def test_entry_formats() -> None:
    assert entry_bytes(BASELINES["v3.2"], "fp8") == (656, 132)
    assert entry_bytes(BASELINES["v3.2"], "bf16") == (1152, 256)
    assert entry_bytes(BASELINES["v3"], "fp8") == (656, 0)
    assert entry_bytes(PRESETS["v4-pro"], "fp8", "fp4") == (584, 68)
    assert entry_bytes(PRESETS["v4-pro"], "fp8", "fp8") == (584, 132)
    assert entry_bytes(PRESETS["v4-flash"], "bf16") == (1024, 256)
    with pytest.raises(ValueError):
        entry_bytes(PRESETS["v4-pro"], "int4")


def test_kv_per_token_and_sequence() -> None:
    assert kv_bytes_per_token(BASELINES["v3.2"], "fp8") == 61 * 788
    assert kv_bytes_per_token(PRESETS["v4-pro"], "fp8") == pytest.approx(
        30 * (584 + 68) / 4 + 31 * 584 / 128)
    v32 = sum(kv_bytes_per_sequence(BASELINES["v3.2"], M, "bf16").values())
    assert v32 / 2**30 == pytest.approx(83.875)  # vLLM blog: 83.9 GiB
    pro = kv_bytes_per_sequence(PRESETS["v4-pro"], M, "bf16")
    assert (pro["compressed"] + pro["indexer"]) / 2**30 == pytest.approx(9.62, abs=0.005)
    assert pro["state"] == 30 * (65536 + 16384) + 31 * 524288
    assert pro["window"] == 61 * 128 * 1024


def test_baseline_active_params() -> None:
    v3 = BASELINES["v3"]
    weights = sum(v for k, v in flops_per_token(v3, 0).items() if k.startswith("linear") or
                  k == "head") / 2
    embed = v3.vocab_size * v3.hidden_size
    assert 36e9 < weights + embed < 38e9  # P_act ~ 37 B (incl. embedding)


def test_v3_2_flops_at_1m() -> None:
    f = flops_per_token(BASELINES["v3.2"], M)
    assert sum(f.values()) == pytest.approx(1.157e12, rel=0.01)
    assert f["indexer.scores"] == 2 * 61 * 64 * 128 * (M + 1)
    assert f["attention.mla"] == 2 * 61 * 128 * 2048 * (576 + 512)


def test_v4_layer_kinds() -> None:
    pro = PRESETS["v4-pro"]
    csa = layer_flops(pro, 2, M)
    hca = layer_flops(pro, 3, M)
    assert csa["attention.csa"] == 2 * 128 * (128 + 1024) * 1024
    assert csa["indexer.scores"] == 2 * 64 * 128 * ((M + 1) // 4)
    assert hca["attention.hca"] == 2 * 128 * (128 + (M + 1) // 128) * 1024
    assert "indexer.scores" not in hca


def test_ratios_in_every_format() -> None:
    a = analyze(["v4-pro", "v4-flash"], M)
    assert 0.25 < a.flops_ratio("v4-pro") < 0.28
    assert 0.11 < a.flops_ratio("v4-flash") < 0.13  # published 10%: not reproduced
    assert 0.10 < a.kv_ratio("v4-pro") < 0.11
    assert 0.07 < a.kv_ratio("v4-flash") < 0.075
    bf16 = analyze(["v4-pro"], M, kv_format="bf16")
    assert bf16.kv_ratio("v4-pro") == pytest.approx(0.115, abs=0.002)


def test_claim_verdicts() -> None:
    verdict = {(c.model, c.quantity): c.matches for c in claim_checks()}
    assert verdict == {("v4-pro", "flops"): True, ("v4-pro", "kv"): True,
                       ("v4-flash", "flops"): False, ("v4-flash", "kv"): True}
