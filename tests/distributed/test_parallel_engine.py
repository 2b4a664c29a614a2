"""The multi-process engine (`LLM(..., tensor_parallel_size=N)`: real worker processes over gloo,
as `dsv4 serve -tp N` starts them) against the single-process engine, and what happens when a
worker dies or hangs."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from rank_threads import parallel_test_config

from dsv4.engine.outputs import WorkerDiedError
from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams

BASE = dict(device="cpu", dtype=torch.float64, max_model_len=256, block_size=16,
            kv_cache_memory=32 << 20, max_num_batched_tokens=24)  # chunked prefill
LAYOUTS = {"tp2": dict(tensor_parallel_size=2),
           "tp2-ep": dict(tensor_parallel_size=2, enable_expert_parallel=True),
           "tp4-ep": dict(tensor_parallel_size=4, enable_expert_parallel=True),
           "tp4-ep2": dict(tensor_parallel_size=4, expert_parallel_size=2),  # -ep 2: 2 x 2
           "dp2-ep": dict(data_parallel_size=2, enable_expert_parallel=True),
           "tp2-dp2-ep": dict(tensor_parallel_size=2, data_parallel_size=2,
                              enable_expert_parallel=True)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt",
                                parallel_test_config(), tokenizer=False, seed=5))


def _mixed_batch():
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (40, 3, 25, 60)]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True)]
    return [{"prompt_token_ids": p} for p in prompts], params


def _run(llm: LLM):
    prompts, params = _mixed_batch()
    outs = llm.generate(prompts, params)
    return ([o.outputs[0].token_ids for o in outs],
            [[t.logprob for t in o.outputs[0].logprobs] for o in outs if o.outputs[0].logprobs],
            [[t.logprob for t in o.prompt_logprobs[1:]] for o in outs if o.prompt_logprobs])


@pytest.fixture(scope="module")
def single(checkpoint):
    return _run(LLM(checkpoint, **BASE))


def _stopped(llm: LLM) -> bool:
    procs = llm.engine.workers.processes.values()
    return all(not p.is_alive() for p in procs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_workers_give_the_single_process_outputs(checkpoint, single, layout):
    llm = LLM(checkpoint, **BASE, **LAYOUTS[layout])
    groups = []  # the data-parallel group each request went to
    for g, scheduler in enumerate(llm.engine.schedulers):
        real = scheduler.add_request
        scheduler.add_request = lambda req, real=real, g=g: (groups.append(g), real(req))[1]
    try:
        tokens, lps, prompt_lps = _run(llm)
        assert all(s.block_manager.all_free() for s in llm.engine.schedulers)
    finally:
        llm.engine.shutdown()
    # requests spread over the groups; the one that finishes first idles in the others' steps
    assert sorted(set(groups)) == list(range(LAYOUTS[layout].get("data_parallel_size", 1)))
    assert tokens == single[0]  # greedy and seeded sampling, token for token
    for got, want in zip(lps + prompt_lps, single[1] + single[2]):
        assert got == pytest.approx(want, abs=1e-5)
    assert _stopped(llm)


@pytest.mark.parametrize("layout", ["tp2-ep", "dp2-ep"])
def test_speculative_decoding_across_ranks(checkpoint, layout):
    """MTP drafts verified on every rank alike: tensor-parallel ranks accept the same drafts
    (greedy, seeded sampling, logprobs as one process gives them), and data-parallel groups
    run the MTP block in lockstep through its MoE whatever each group drafts."""
    spec = dict(speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    want = _run(LLM(checkpoint, **BASE, **spec))
    llm = LLM(checkpoint, **BASE, **LAYOUTS[layout], **spec)
    try:
        tokens, lps, prompt_lps = _run(llm)
        assert all(s.block_manager.all_free() for s in llm.engine.schedulers)
        assert llm.engine.stats().spec_draft_tokens > 0
    finally:
        llm.engine.shutdown()
    assert tokens == want[0]
    for got, ref in zip(lps + prompt_lps, want[1] + want[2]):
        assert got == pytest.approx(ref, abs=1e-5)


def test_preemption_and_abort_under_tensor_parallelism(checkpoint):
    """A cache too small for the batch preempts and recomputes on every rank alike."""
    # 4 state slots, too few blocks for four 54-token requests (prefix caching on: its swa
    # blocks and CSA boundary state take their share)
    tight = dict(BASE, kv_cache_memory=1_560_000, max_model_len=80, max_num_seqs=4,
                 max_num_batched_tokens=64)
    prompts = [{"prompt_token_ids": list(range(n, n + 30))} for n in (1, 50, 100, 150)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(checkpoint, **tight).generate(prompts, params)]
    llm = LLM(checkpoint, **tight, tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.scheduler.num_preemptions > 0
        eng = llm.engine
        eng.add_request("a", list(range(40)), params)
        eng.step()
        eng.abort_request("a")
        assert eng.block_manager.all_free()
    finally:
        llm.engine.shutdown()
    assert got == want


def test_data_parallel_groups_take_the_requests_whose_prefix_they_cache(checkpoint):
    """Each DP group has its own cache: a request goes to the group that holds the longest
    cached prefix of it (not merely the least loaded), every rank loads the prefix's CSA state,
    and the tokens equal a single process that computes everything."""
    g = torch.Generator().manual_seed(6)
    a, b = (torch.randint(0, 512, (40,), generator=g).tolist() for _ in range(2))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    later = [{"prompt_token_ids": b + [3, 4]}, {"prompt_token_ids": a + [5]}]  # b's first
    cold = LLM(checkpoint, **BASE, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in cold.generate(later, params)]
    llm = LLM(checkpoint, **BASE, data_parallel_size=2, enable_expert_parallel=True)
    try:
        llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}], params)  # a: group 0
        outs = llm.generate(later, params)
        assert all(s.block_manager.all_free() for s in llm.engine.schedulers)
    finally:
        llm.engine.shutdown()
    assert [o.num_cached_tokens for o in outs] == [32, 32]  # least loaded would miss both
    assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_worker_fails_requests_not_the_caller(checkpoint, how):
    """A worker killed (or stopped) mid-request: the next step raises WorkerDiedError within the
    collective timeout, every request is aborted with its blocks freed, and no process is left."""
    llm = LLM(checkpoint, **BASE, tensor_parallel_size=2, dist_timeout=5)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    eng.add_request("a", list(range(30)), params)
    eng.add_request("b", list(range(9)), params)
    eng.step()
    worker = eng.workers.processes[1]
    os.kill(worker.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="rank 1|dist-timeout"):
        for _ in range(20):
            eng.step()
    assert time.monotonic() - t0 < 5 + 10
    assert not eng.has_unfinished_requests() and eng.block_manager.all_free()
    assert eng.failure() is not None
    eng.shutdown()
    assert _stopped(llm)


def test_fp8_cache_format_under_tensor_parallelism(checkpoint):
    """584-byte FP8 entries with FP4 indexer keys: the same tokens split over two ranks."""
    fp8 = dict(BASE, kv_cache_dtype="fp8")
    prompts, params = _mixed_batch()
    want = [o.outputs[0].token_ids for o in LLM(checkpoint, **fp8).generate(prompts, params)]
    llm = LLM(checkpoint, **fp8, tensor_parallel_size=2, enable_expert_parallel=True)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.engine.shutdown()
    assert got == want
