"""The compiled decode step (`compile_decode`, dsv4.model.decode_graph): the same greedy tokens
as the eager engine, pure decode steps through it, everything else eager."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dsv4.engine_args import EngineArgs
from dsv4.llm import LLM
from dsv4.model.decode_graph import DecodeGraphs
from dsv4.sampling_params import SamplingParams


def _run(path, device: str, compile_decode: bool) -> tuple[list[list[int]], int]:
    """Greedy tokens of three requests decoded together (3 rows: bucket 4, one pad row), and
    the rows of each compiled step."""
    llm = LLM(path, device=device, kv_cache_memory=32 << 20, max_model_len=128, block_size=16,
              max_num_batched_tokens=24, emulate_quant=False, compile_decode=compile_decode)
    graphs = llm.engine.runner.decode_graphs
    calls = []
    if graphs is not None:
        real = graphs.run_layers
        graphs.run_layers = lambda *a: calls.append(a[0].shape[1]) or real(*a)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 3, 11)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs], calls


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny_checkpoint):
    # dense weights: FP8 ones split each region at every dequantization (more graphs to build)
    path = tiny_checkpoint(tiny_config(weight_dtype=None, expert_dtype=None, scale_fmt=None))
    eager, no_calls = _run(path, "cpu", False)
    compiled, calls = _run(path, "cpu", True)
    assert no_calls == []
    assert compiled == eager
    assert calls == [3] * 7  # every step after the prefill one, padded to 4 rows  # pure decode steps of every batch size went compiled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_decode_gives_the_eager_tokens_on_cuda(tiny_checkpoint):
    path = tiny_checkpoint()
    eager, _ = _run(path, "cuda", False)
    compiled, calls = _run(path, "cuda", True)
    assert compiled == eager and calls


def test_buckets_are_powers_of_two():
    assert [DecodeGraphs.bucket(r) for r in (1, 2, 3, 4, 5, 9, 32, 33)] == \
        [1, 2, 4, 4, 8, 16, 32, 64]


def test_compile_decode_needs_one_rank():
    with pytest.raises(ValueError, match="compile_decode"):
        EngineArgs(compile_decode=True, tensor_parallel_size=2)
