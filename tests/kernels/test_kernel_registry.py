"""The op registry: resolution per device, forcing, errors, and the whole tiny model run through
the Triton kernels (interpreter) against the torch path."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import KERNEL_DEVICE, rel_err, tiny_config

from dsv4.engine_args import EngineArgs
from dsv4.model import load_model
from dsv4.ops import OPS, SPECS, configure, parse_spec, resolve


@pytest.fixture
def restore_ops():
    yield
    configure("cpu", "")  # back to torch everywhere for the rest of the session


def test_kernel_registry_cpu_defaults_to_torch_and_cuda_to_triton(monkeypatch):
    monkeypatch.delenv("DSV4_OPS", raising=False)
    assert set(resolve("cpu").values()) == {"torch"}
    pytest.importorskip("triton")
    hopper = resolve("cuda", capability=(9, 0))
    assert {n for n, b in hopper.items() if b == "triton"} == {
        n for n, s in SPECS.items() if s.triton}
    ampere = resolve("cuda", capability=(8, 0))
    assert ampere["fp8_linear"] == "torch" and ampere["sparse_attention"] == "triton"
    with pytest.raises(ValueError, match="fp8_linear=triton needs compute capability 8.9"):
        resolve("cuda", "fp8_linear=triton", capability=(8, 0))
    assert resolve("cuda", "rms_norm=torch", capability=(9, 0))["rms_norm"] == "torch"


def test_kernel_registry_spec_errors_name_the_field(monkeypatch):
    with pytest.raises(ValueError, match="unknown op 'rmsnorm'"):
        parse_spec("rmsnorm=torch")
    with pytest.raises(ValueError, match="NAME=BACKEND"):
        parse_spec("rms_norm=cuda")
    with pytest.raises(ValueError, match="unknown op"):
        EngineArgs(ops="nope=torch")
    assert parse_spec("all=torch, rope=triton")["rope"] == "triton"
    monkeypatch.setenv("DSV4_OPS", "hc_pre=triton")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="hc_pre=triton needs a CUDA device"):
        resolve("cpu")  # read from $DSV4_OPS; no interpreter, no CPU Triton


def test_kernel_registry_logs_the_table_and_swaps_implementations(caplog, restore_ops):
    pytest.importorskip("triton")
    with caplog.at_level(logging.INFO, logger="dsv4.ops"):
        table = configure(KERNEL_DEVICE, "all=torch,rms_norm=triton")
    assert table["rms_norm"] == "triton" and table["rope"] == "torch"
    assert "rms_norm=triton" in caplog.text
    assert OPS.rms_norm.__module__ == "dsv4.kernels.rms_norm"
    configure("cpu", "")
    assert OPS.rms_norm.__module__ == "dsv4.model.layers"


@pytest.mark.slow
def test_kernel_model_through_triton_ops_matches_torch(tiny_checkpoint, restore_ops):
    """Every op forced to its Triton kernel (interpreter on CPU): the tiny FP8 model's logits
    stay within fp32 reduction-order noise of the torch path (QAT rounding off: a 1-ulp
    difference may otherwise cross an FP8 rounding step). On a GPU (gpu_check) the same in
    bf16, where the two paths round differently: a bf16-sized bound."""
    pytest.importorskip("triton")
    # index_topk 2: CSA layers past top-k, so the gathered source of the attention is used too
    path = tiny_checkpoint(tiny_config(weight_dtype="fp8", expert_dtype="fp4", index_topk=2))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    dev = KERNEL_DEVICE
    ref = load_model(path, device=dev, emulate_quant=False, progress=False, ops="all=torch")
    want = ref(ids.to(dev)).cpu()
    model = load_model(path, device=dev, emulate_quant=False, progress=False,
                       ops="all=triton")
    assert OPS.sparse_attention.__module__ == "dsv4.kernels.sparse_attention"
    got = model(ids.to(dev)).cpu()
    assert rel_err(got, want) < (1e-4 if dev == "cpu" else 5e-2), rel_err(got, want)


@pytest.mark.slow
def test_kernel_engine_fp8_cache_through_triton_ops(tiny_checkpoint, restore_ops):
    """The engine's paged fp8 cache (584-byte-style entries written by the kv_write kernel;
    window, entries and FP4 indexer keys read in place by the attention and indexer kernels;
    batched decode rows): greedy tokens equal the torch path's (on a GPU, in bf16: both
    complete). Only the cache ops are forced (the interpreter is slow; the test above runs
    every op)."""
    pytest.importorskip("triton")
    from dsv4.llm import LLM
    from dsv4.sampling_params import SamplingParams

    path = tiny_checkpoint(tiny_config(weight_dtype="fp8", expert_dtype="fp4", index_topk=2))
    prompts = [list(range(3, 12)), list(range(40, 45))]  # two decode rows, ragged
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = {}
    cache_ops = ("kv_write=triton,kv_quant=triton,sparse_attention=triton,"
                 "indexer_scores=triton,indexer_topk=triton")
    for ops in ("all=torch", cache_ops):
        llm = LLM(path, device=KERNEL_DEVICE, kv_cache_dtype="fp8", kv_cache_memory=16 << 20,
                  max_model_len=64, block_size=16, ops=ops, enable_prefix_caching=False)
        outs[ops] = [o.outputs[0].token_ids for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=params)]
    assert all(len(t) == 3 for out in outs.values() for t in out)
    if KERNEL_DEVICE == "cpu":  # fp32: the same tokens; bf16 may break a near tie either way
        assert outs[cache_ops] == outs["all=torch"]
