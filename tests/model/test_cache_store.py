"""Every cache store implements its protocol of dsv4.model.cache_store, with the same signatures.

runtime_checkable's isinstance only checks that the names exist, so each method is also compared
with the protocol's: parameter names, kinds, defaults and (resolved) annotations, and the return
annotation. A store whose signature drifts from the interface the attention calls fails here.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from conftest import tiny_config
from dsv4.cache.block_manager import BlockManager
from dsv4.cache.decode_group import DecodeGroup
from dsv4.cache.kv_cache import KVCache, RequestView
from dsv4.engine.engine_config import EngineConfig
from dsv4.model.cache_store import (
    BatchedCompressorStore,
    BatchedLayerStore,
    CompressorStore,
    LayerStore,
)
from dsv4.model.sequence_cache import SequenceCache

# (layer protocol, its compressor-store protocol)
SEGMENT = (LayerStore, CompressorStore)
BATCHED = (BatchedLayerStore, BatchedCompressorStore)


def members(protocol: type) -> tuple[list[str], list[str]]:
    """(methods, properties) the protocol declares in its own body."""
    methods = [n for n, v in vars(protocol).items() if inspect.isfunction(v)
               and not n.startswith("_")]
    props = [n for n, v in vars(protocol).items() if isinstance(v, property)]
    return methods, props


def signature_drift(protocol: type, impl: type) -> list[str]:
    """How impl's methods differ from the protocol's (empty: they match)."""
    problems = []
    for name in members(protocol)[0]:
        want_fn, got_fn = getattr(protocol, name), getattr(impl, name, None)
        if got_fn is None:
            problems.append(f"{name}: missing")
            continue
        want, got = inspect.signature(want_fn), inspect.signature(got_fn)
        want_types, got_types = typing.get_type_hints(want_fn), typing.get_type_hints(got_fn)
        want_params, got_params = list(want.parameters.values()), list(got.parameters.values())
        if [(p.name, p.kind, p.default) for p in want_params] != \
                [(p.name, p.kind, p.default) for p in got_params]:
            problems.append(f"{name}: parameters {got} != {want}")
            continue
        for p in want_params[1:]:  # self is unannotated
            if want_types.get(p.name) != got_types.get(p.name):
                problems.append(f"{name}({p.name}): {got_types.get(p.name)} != "
                                f"{want_types.get(p.name)}")
        if want_types.get("return") != got_types.get("return"):
            problems.append(f"{name} -> {got_types.get('return')} != {want_types.get('return')}")
    return problems


def check(layer_store: object, protocols: tuple[type, type]) -> int:
    """Assert a layer store and its compressor stores satisfy the protocols; returns how many
    compressor stores it has."""
    layer_proto, comp_proto = protocols
    assert isinstance(layer_store, layer_proto)
    assert not signature_drift(layer_proto, type(layer_store)), \
        signature_drift(layer_proto, type(layer_store))
    n = 0
    for name in members(layer_proto)[1]:  # compressor, indexer
        store = getattr(layer_store, name)
        if store is None:
            continue
        n += 1
        assert isinstance(store, comp_proto)
        assert not signature_drift(comp_proto, type(store)), \
            signature_drift(comp_proto, type(store))
        for prop in members(comp_proto)[1]:  # num_entries
            assert hasattr(store, prop)
    return n


def paged_cache() -> tuple[KVCache, BlockManager]:
    cfg = tiny_config()
    ec = EngineConfig(max_model_len=128, block_size=16, max_num_batched_tokens=32,
                      kv_cache_memory=4 << 20)
    bm = BlockManager.from_config(cfg, ec)
    return KVCache(cfg, bm, "cpu", torch.float32), bm


def test_sequence_cache_implements_the_segment_stores():
    cache = SequenceCache.empty(tiny_config())  # layer kinds swa, csa, hca, csa
    counts = [check(layer, SEGMENT) for layer in cache.layers]
    assert counts == [0, 2, 1, 2]


def test_paged_stores_implement_their_protocols():
    cache, bm = paged_cache()
    assert bm.allocate("a", 0, 20) and bm.allocate("b", 0, 9)
    tables = {r: bm.block_tables(r) for r in ("a", "b")}
    view = RequestView(cache, tables["a"], 0, bm.state_slot("a"), 0)
    group = DecodeGroup(cache, [tables["a"], tables["b"]], [0, 0],
                        [bm.state_slot("a"), bm.state_slot("b")], [19, 8])
    layers = range(cache.config.num_hidden_layers)
    assert [check(view.layer(i), SEGMENT) for i in layers] == [0, 2, 1, 2]
    assert [check(group.layer(i), BATCHED) for i in layers] == [0, 2, 1, 2]
    # the two paths' stores are not interchangeable
    assert not isinstance(view.layer(1), BatchedLayerStore)
    assert not isinstance(group.layer(1), LayerStore)


class _Drifted:
    """A compressor store whose method signatures moved away from CompressorStore's."""

    def pending(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...  # renamed
    def set_pending(self, kv: torch.Tensor, score: torch.Tensor) -> None: ...
    def previous(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    def set_previous(self, kv: torch.Tensor, score: torch.Tensor) -> None: ...
    def observe(self, start: int, kv: torch.Tensor, score: torch.Tensor) -> None: ...
    def append(self, entries: torch.Tensor, extra: int = 0) -> None: ...  # added
    def entry_slots(self, count: int) -> tuple[torch.Tensor, torch.Tensor, None]: ...  # narrowed


def test_a_drifted_signature_is_caught():
    store = _Drifted()
    assert isinstance(store, CompressorStore)  # names alone pass runtime_checkable
    problems = signature_drift(CompressorStore, _Drifted)
    assert [p.split(":")[0].split(" ")[0] for p in problems] == \
        ["pending", "append", "entry_slots"], problems


@pytest.mark.parametrize("protocol", [LayerStore, CompressorStore, BatchedLayerStore,
                                      BatchedCompressorStore])
def test_protocols_declare_typed_members(protocol):
    methods, props = members(protocol)
    assert methods
    for name in methods:
        hints = typing.get_type_hints(getattr(protocol, name))
        params = list(inspect.signature(getattr(protocol, name)).parameters)[1:]
        assert "return" in hints and all(p in hints for p in params), name
    for name in props:
        assert "return" in typing.get_type_hints(getattr(protocol, name).fget)
