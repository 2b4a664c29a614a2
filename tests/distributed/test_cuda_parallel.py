"""NCCL on real GPUs: the multi-process engine at TP 2 (+ EP) against one GPU. Needs two CUDA
devices; skipped elsewhere (the CPU tests over gloo carry the proof there)."""

from __future__ import annotations

import pytest
import torch
from rank_threads import parallel_test_config

from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.parametrize("ep", [False, True])
def test_cuda_tensor_parallel_greedy_equals_one_gpu(tmp_path, ep):
    ckpt = str(write_checkpoint(tmp_path / "ckpt", parallel_test_config(), tokenizer=False,
                                seed=8))
    common = dict(device="cuda", dtype=torch.float32, max_model_len=256,
                  kv_cache_memory=64 << 20, emulate_quant=False)
    prompts = [{"prompt_token_ids": list(range(3, 60))}, {"prompt_token_ids": [9, 10, 11]}]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    one = LLM(ckpt, **common).generate(prompts, params)
    llm = LLM(ckpt, **common, tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        two = llm.generate(prompts, params)
    finally:
        llm.engine.shutdown()
    for a, b in zip(one, two):
        lp_a = [t.logprob for t in a.outputs[0].logprobs]
        lp_b = [t.logprob for t in b.outputs[0].logprobs]
        assert lp_b == pytest.approx(lp_a, abs=1e-4)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
