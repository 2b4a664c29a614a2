"""Measured vs analytic: dsv4's real model decodes one token on the meta device at real widths
(a few layers of each kind) under FlopCounterMode; every layer kind must agree within 2%."""

from __future__ import annotations

import pytest

from dsv4.analysis.measure import compare, model_api_available
from dsv4.config import PRESETS

pytestmark = pytest.mark.skipif(not model_api_available(),
                                reason="dsv4.model / SequenceCache.synthetic missing")


@pytest.mark.parametrize("preset", ["v4-flash", "v4-pro"])
@pytest.mark.parametrize("context", [100_001, 1 << 20])
def test_meta_flops_match_analytic(preset: str, context: int) -> None:
    checks = compare(PRESETS[preset], context)
    assert {c.kind for c in checks} == {"swa", "csa", "hca", "head"}
    for c in checks:
        assert c.measured > 0
        assert c.rel_err < 0.02, (c.kind, c.analytic, c.measured)


@pytest.mark.parametrize("preset", ["v4-flash", "v4-pro"])
def test_synthetic_cache_entries_match_bf16_kv(preset: str) -> None:
    import torch

    from dsv4.analysis.kv import kv_bytes_per_sequence
    from dsv4.model import SequenceCache

    cfg, n = PRESETS[preset], 1 << 20
    cache = SequenceCache.synthetic(cfg, n, device="meta", dtype=torch.bfloat16)

    def nbytes(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.nelement() * t.element_size()

    main = sum(nbytes(s.compressor.entries) for s in cache.layers if s.compressor)
    index = sum(nbytes(s.indexer.entries) for s in cache.layers if s.indexer)
    kv = kv_bytes_per_sequence(cfg, n, "bf16")
    assert (main, index) == (kv["compressed"], kv["indexer"])
