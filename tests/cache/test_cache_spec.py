"""CacheSpec bytes against architecture.md 3.3 and 6.1 (V4-Flash and V4-Pro)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import tiny_config

from dsv4.cache.spec import (
    build_cache_specs,
    entry_bytes,
    index_entry_bytes,
    kv_bytes_per_seq,
    kv_bytes_per_token,
    state_bytes_per_seq,
)
from dsv4.config import PRESETS

GiB, MiB = 2**30, 2**20


def test_entry_formats():
    assert entry_bytes("fp8", 512, 64) == 584  # 448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad
    assert entry_bytes("bf16", 512, 64) == 1024
    assert entry_bytes("fp32", 512, 64) == 2048
    assert index_entry_bytes("fp4", 128) == 68
    assert index_entry_bytes("fp8", 128) == 132
    assert index_entry_bytes("bf16", 128) == 256
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        entry_bytes("int8", 512, 64)
    with pytest.raises(ValueError, match="index_cache_dtype"):
        index_entry_bytes("int4", 128)


@pytest.mark.parametrize("name, num_swa, num_csa, num_hca", [
    ("v4-flash", 2, 21, 20), ("v4-pro", 0, 30, 31)])
def test_layer_split(name, num_swa, num_csa, num_hca):
    cfg = PRESETS[name]
    specs = build_cache_specs(cfg)
    assert specs["swa"].num_layers == cfg.num_hidden_layers  # every layer has a window
    assert specs["csa"].num_layers == num_csa and specs["csa"].ratio == 4
    assert specs["hca"].num_layers == num_hca and specs["hca"].ratio == 128
    assert cfg.num_hidden_layers - num_csa - num_hca == num_swa
    with_mtp = build_cache_specs(cfg, num_mtp_layers=1)
    assert with_mtp["swa"].num_layers == cfg.num_hidden_layers + 1


@pytest.mark.parametrize("kv, idx, csa, hca", [
    ("fp8", "fp4", 163.0, 584 / 128), ("fp8", "fp8", 179.0, 584 / 128), ("bf16", None, 320.0, 8.0)])
def test_per_layer_per_token_growth(kv, idx, csa, hca):
    specs = build_cache_specs(PRESETS["v4-flash"], kv, idx)
    assert specs["csa"].bytes_per_token() / specs["csa"].num_layers == csa
    assert specs["hca"].bytes_per_token() / specs["hca"].num_layers == hca
    assert specs["swa"].bytes_per_token() == 0.0


def test_compressor_state_bytes_per_layer():
    specs = build_cache_specs(PRESETS["v4-flash"])
    assert specs["csa"].state_bytes == 65_536 + 16_384
    assert specs["hca"].state_bytes == 524_288
    assert specs["swa"].state_bytes == 0


# architecture.md 3.3 at P = 2^20 (the doc truncates to two decimals: Pro FP8 is 4.9178 GiB)
@pytest.mark.parametrize("name, kv, idx, gib", [
    ("v4-flash", "bf16", None, 6.72), ("v4-flash", "fp8", "fp4", 3.43),
    ("v4-flash", "fp8", "fp8", 3.76), ("v4-pro", "bf16", None, 9.62),
    ("v4-pro", "fp8", "fp4", 4.91), ("v4-pro", "fp8", "fp8", 5.38)])
def test_kv_bytes_at_1m_tokens(name, kv, idx, gib):
    specs = build_cache_specs(PRESETS[name], kv, idx)
    value = kv_bytes_per_seq(specs, 2**20) / GiB
    assert math.floor(value * 100) / 100 == gib
    assert abs(value - gib) < 0.01


@pytest.mark.parametrize("name, window_mib, state_mib", [
    ("v4-flash", 5.4, 11.6), ("v4-pro", 7.6, 17.8)])
def test_window_and_state_at_1m_tokens(name, window_mib, state_mib):
    specs = build_cache_specs(PRESETS[name], "bf16")
    assert round(specs["swa"].seq_bytes(2**20) / MiB, 1) == window_mib
    assert round(state_bytes_per_seq(specs) / MiB, 1) == state_mib
    assert specs["swa"].seq_bytes(100) == 100 * 1024 * PRESETS[name].num_hidden_layers


@pytest.mark.parametrize("name, per_token", [("v4-pro", 4939.5), ("v4-flash", 3450.0)])
def test_payload_only_per_token(name, per_token):
    """architecture.md 6.1: 576 B main payload + 64 B FP4 indexer payload, no scales."""
    specs = build_cache_specs(PRESETS[name], "fp8", "fp4")
    payload = {k: dataclasses.replace(s, entry_bytes=576,
                                      index_entry_bytes=64 if k == "csa" else 0)
               for k, s in specs.items()}
    assert kv_bytes_per_token(payload) == per_token


def test_block_bytes_in_source_tokens():
    specs = build_cache_specs(PRESETS["v4-flash"], "fp8", "fp4")
    assert specs["swa"].entries_per_block(256) == 256
    assert specs["csa"].entries_per_block(256) == 64
    assert specs["hca"].entries_per_block(256) == 2
    assert specs["csa"].block_bytes(256) == 64 * 21 * (584 + 68)
    assert specs["hca"].block_bytes(256) == 2 * 20 * 584
    with pytest.raises(ValueError, match="multiple"):
        specs["hca"].block_bytes(64)


def test_tiny_config_kinds():
    specs = build_cache_specs(tiny_config(), "bf16")
    assert set(specs) == {"swa", "csa", "hca"}
    assert specs["csa"].layer_ids == (1, 3) and specs["hca"].layer_ids == (2,)
    assert specs["hca"].ratio == 8 and specs["swa"].window == 8
    swa_only = build_cache_specs(tiny_config(compress_ratios=(0, 0, 0, 0)))
    assert set(swa_only) == {"swa"}
    assert kv_bytes_per_token(swa_only) == 0.0
