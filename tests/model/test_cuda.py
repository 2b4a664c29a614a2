"""CUDA: the same code path in bf16 on a GPU (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_config

from dsv4.model import load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_bf16_forward_close_to_cpu_fp32(tiny_checkpoint):
    path = tiny_checkpoint(tiny_config(weight_dtype="fp8", expert_dtype="fp4"))
    cpu = load_model(path, device="cpu", emulate_quant=False, progress=False)
    gpu = load_model(path, device="cuda", emulate_quant=False, progress=False)
    assert gpu.compute_dtype == torch.bfloat16
    assert gpu.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn  # still FP8 on the GPU
    ids = torch.randint(0, 512, (2, 40))
    want = cpu(ids)
    got = gpu(ids.cuda()).cpu()
    assert rel_err(got, want) < 5e-2
    cache = gpu.new_cache()
    steps = torch.cat([gpu(ids[:, i:i + 1].cuda(), cache) for i in range(40)], dim=1).cpu()
    assert rel_err(steps, got) < 5e-2


def test_cuda_engine_generates(tiny_checkpoint):
    from dsv4.llm import LLM
    from dsv4.sampling_params import SamplingParams

    llm = LLM(tiny_checkpoint(tiny_config()), device="cuda", kv_cache_memory=64 << 20,
              max_model_len=256, block_size=16)
    outs = llm.generate(prompt_token_ids=[[1, 2, 3], list(range(40))],
                        sampling_params=SamplingParams(temperature=0, max_tokens=8,
                                                       ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
    assert llm.engine.block_manager.all_free()
