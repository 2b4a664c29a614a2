"""Prefix caching end to end: a request that starts after a cached prefix computes what a cold
run computes, whatever kind of window the prefix ends in, in mixed batches, while the blocks'
first owner still runs, through preemption, abort and eviction, and no block leaks.

Block size 16 with the tiny config's CSA ratio 4 and HCA ratio 8: a hit always ends whole CSA
and HCA windows; where the shared part ends inside a window (or a block), the rest of it is
recomputed. sliding_window 8 fits in one block, 24 spans two."""

from __future__ import annotations

import pytest
import torch

from conftest import FP32_BOUND, FP64_BOUND, rel_err, tiny_config
from dsv4 import SamplingParams
from dsv4.engine.model_runner import ModelRunner
from test_llm_engine import GREEDY, TIGHT_EXACT, make_llm, prompts_of, record_logits  # noqa: F401

B = 16
EXACT = dict(dtype=torch.float64)


def tails(n: int, length: int, seed: int) -> list[list[int]]:
    return prompts_of([length] * n, seed=seed)


def check_against_full(llm, outs, seen, bound) -> None:
    """Every sampled row's logits equal the full forward's over prompt + tokens so far."""
    for out in outs:
        prompt = out.prompt_token_ids
        seq = torch.tensor([prompt + out.outputs[0].token_ids[:-1]])
        full = llm.engine.model(seq)[0, len(prompt) - 1:]
        got = torch.stack(seen[out.request_id])
        assert got.shape == full.shape
        assert rel_err(got, full) <= bound, out.request_id


def assert_nothing_held(llm) -> None:
    bm = llm.engine.block_manager
    assert bm.all_free()
    assert all(p.ref_counts == [0] * p.num_blocks for p in [*bm.pools.values(), bm.state_pool])


@pytest.mark.parametrize("window", [8, 24])
def test_hit_equals_cold_wherever_the_prefix_ends(tiny_checkpoint, record_logits, window):
    """fp64 with QAT rounding on: shared prefixes ending inside and at the edge of a sliding
    window, a CSA window (4), an HCA window (8) and a block (16); one request whose first step
    after the hit is a single token (the batched decode path loads the boundary state too)."""
    path = tiny_checkpoint(tiny_config(index_topk=2, sliding_window=window))
    llm = make_llm(path, **EXACT)
    base = prompts_of([70], seed=5)[0]
    params = SamplingParams(max_tokens=3, **GREEDY)
    cases = [(15, 5), (16, 5), (17, 3), (20, 6), (24, 5), (31, 4), (32, 1), (33, 5), (40, 5),
             (48, 9), (64, 1)]
    for k, (shared, tail) in enumerate(cases):
        first, second = tails(2, tail, seed=100 + k)
        warm = llm.generate(prompt_token_ids=[base[:shared] + first], sampling_params=params)
        hit = llm.generate(prompt_token_ids=[base[:shared] + second], sampling_params=params)
        want = (min(shared, shared + tail - 1) // B) * B
        assert hit[0].num_cached_tokens == want, (shared, tail)
        check_against_full(llm, warm + hit, record_logits, FP64_BOUND)
    assert llm.engine.stats().prefix_cache_hits > 0
    assert_nothing_held(llm)


def test_fp32_hit_within_the_batch_shape_bound(tiny_checkpoint, record_logits):
    """fp32, QAT rounding off: a hit moves logits no more than any other batch shape does."""
    llm = make_llm(tiny_checkpoint(tiny_config(index_topk=2)), emulate_quant=False)
    base = prompts_of([60], seed=7)[0]
    params = SamplingParams(max_tokens=4, **GREEDY)
    prompts = [base[:50] + t for t in tails(3, 6, seed=8)]
    outs = [llm.generate(prompt_token_ids=[p], sampling_params=params)[0] for p in prompts]
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48]
    check_against_full(llm, outs, record_logits, FP32_BOUND)


def test_greedy_tokens_equal_an_engine_without_caching(tiny_checkpoint):
    path = tiny_checkpoint(tiny_config(index_topk=2))
    base = prompts_of([45], seed=9)[0]
    prompts = [base + t for t in tails(4, 7, seed=10)]
    params = SamplingParams(max_tokens=12, **GREEDY)
    cold = make_llm(path, enable_prefix_caching=False, **EXACT)
    warm = make_llm(path, **EXACT)
    want = [cold.generate(prompt_token_ids=[p], sampling_params=params)[0] for p in prompts]
    got = [warm.generate(prompt_token_ids=[p], sampling_params=params)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.num_cached_tokens for o in want] == [0] * 4  # off: nothing is looked up
    assert [o.num_cached_tokens for o in got] == [0, 32, 32, 32]
    assert cold.engine.stats().prefix_cache_queries == 0


def test_mixed_batch_and_a_hit_on_a_running_request(tiny_checkpoint, record_logits):
    """A decodes; B reuses blocks A still holds (prompt and decoded ones), C misses, all in
    one batch; each matches the full forward, and A is not disturbed."""
    llm = make_llm(tiny_checkpoint(tiny_config(index_topk=2)), **EXACT)
    eng = llm.engine
    a_prompt = prompts_of([40], seed=11)[0]
    eng.add_request("a", a_prompt, SamplingParams(max_tokens=30, **GREEDY))
    a_out: list[int] = []
    while len(a_prompt) + len(a_out) < 52:  # A's cache covers 3 full blocks
        a_out += [t for o in eng.step() for t in o.new_token_ids]
    b_prompt = a_prompt + a_out[:10] + tails(1, 3, seed=12)[0]
    c_prompt = tails(1, 37, seed=13)[0]
    eng.add_request("b", b_prompt, SamplingParams(max_tokens=8, **GREEDY))
    eng.add_request("c", c_prompt, SamplingParams(max_tokens=8, **GREEDY))
    cached: dict[str, int | None] = {}
    tokens = {"a": list(a_out), "b": [], "c": []}
    shared_rows = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens[o.request_id] += o.new_token_ids
            cached.setdefault(o.request_id, o.num_cached_tokens)
        shared_rows = max(shared_rows, sum(c > 1 for c in eng.block_manager.pools["csa"].ref_counts))
    assert cached["b"] == 48 and cached["c"] == 0
    assert shared_rows >= 3  # A's three blocks were held by A and B at once
    for rid, prompt in (("a", a_prompt), ("b", b_prompt), ("c", c_prompt)):
        seq = torch.tensor([prompt + tokens[rid][:-1]])
        full = eng.model(seq)[0, len(prompt) - 1:]
        assert rel_err(torch.stack(record_logits[rid]), full) <= FP64_BOUND, rid
    assert_nothing_held(llm)


def test_preemption_and_abort_of_shared_blocks(tiny_checkpoint):
    """A tight cache preempts requests whose blocks others share; an aborted request's shared
    blocks stay with the others. Greedy outputs equal a roomy engine without caching."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    base = prompts_of([34], seed=14)[0]
    prompts = [base + t for t in tails(4, 20, seed=15)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    roomy = make_llm(path, enable_prefix_caching=False, **EXACT)
    want = roomy.generate(prompt_token_ids=prompts, sampling_params=params)
    tight = make_llm(path, **TIGHT_EXACT, **EXACT)
    tight.generate(prompt_token_ids=[base + [1]], sampling_params=SamplingParams(max_tokens=1))
    got = tight.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert tight.engine.stats().num_preemptions > 0
    assert all(o.num_cached_tokens == 32 for o in got)
    assert_nothing_held(tight)

    eng = tight.engine  # abort one of two requests that share blocks, mid-decode
    eng.add_request("x", prompts[0], params)
    eng.add_request("y", prompts[1], params)
    got_y: list[int] = []
    for _ in range(5):
        got_y += [t for o in eng.step() if o.request_id == "y" for t in o.new_token_ids]
    shared = [b for b, c in enumerate(eng.block_manager.pools["csa"].ref_counts) if c == 2]
    assert shared  # the base's blocks, held by x and y
    eng.abort_request("x")
    assert all(eng.block_manager.pools["csa"].ref_counts[b] == 1 for b in shared)
    while eng.has_unfinished_requests():
        got_y += [t for o in eng.step() if o.request_id == "y" for t in o.new_token_ids]
    assert got_y == want[1].outputs[0].token_ids
    assert_nothing_held(tight)


def test_eviction_under_a_tiny_budget(tiny_checkpoint):
    """More distinct prompts than the pools hold: cached blocks are evicted least recently
    freed first; a prompt whose blocks were evicted computes again and still gets the same
    tokens; the most recent prefix still hits."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    llm = make_llm(path, **TIGHT_EXACT, **EXACT)
    cold = make_llm(path, enable_prefix_caching=False, **EXACT)
    params = SamplingParams(max_tokens=4, **GREEDY)
    prompts = prompts_of([40] * 6, seed=16)
    for p in prompts:
        llm.generate(prompt_token_ids=[p], sampling_params=params)
    pools = llm.engine.block_manager.pools
    assert sum(p.num_evictions for p in pools.values()) > 0
    again = [llm.generate(prompt_token_ids=[p + [7]], sampling_params=params)[0]
             for p in (prompts[0], prompts[-1])]
    assert again[0].num_cached_tokens == 0  # evicted long ago
    assert again[1].num_cached_tokens == 32  # the last one is still there
    want = [cold.generate(prompt_token_ids=[p + [7]], sampling_params=params)[0]
            for p in (prompts[0], prompts[-1])]
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    assert_nothing_held(llm)


def test_prompt_logprobs_requests_compute_their_prompt(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint(tiny_config()))
    prompt = prompts_of([40], seed=17)[0]
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1))
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=1, prompt_logprobs=1))[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == 40
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1))
    assert again[0].num_cached_tokens == 32  # a whole prompt leaves its last token to compute


def _cold_state(path, tokens: list[int]) -> dict[str, list[torch.Tensor]]:
    """CSA's previous-window rows (first halves) in a cold engine after ``tokens``."""
    eng = make_llm(path, enable_prefix_caching=False, **EXACT).engine
    eng.add_request("c", tokens, SamplingParams(max_tokens=2, **GREEDY))
    eng.step()  # the whole prompt in one chunk; the request keeps its slot
    cache, slot = eng.runner.kv_cache, eng.block_manager.state_slot("c")
    dims = {"csa": eng.model_config.head_dim, "csa_index": eng.model_config.index_head_dim}
    return {key: [t[:, slot, :4, :dim].clone() for t in cache.states[key]]
            for key, dim in dims.items()}


def test_kept_boundary_state_equals_a_cold_runs_state(tiny_checkpoint):
    """The CSA state kept at a block end (written by the prefill path, and by the decode path)
    equals the state a cold request has there: compressor and indexer, kv and score rows."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    llm = make_llm(path, **EXACT)
    long, short = prompts_of([40, 20], seed=18)
    llm.generate(prompt_token_ids=[long], sampling_params=SamplingParams(max_tokens=1))
    decoded = llm.generate(prompt_token_ids=[short], sampling_params=SamplingParams(
        max_tokens=13, **GREEDY))[0].outputs[0].token_ids  # positions 20..31 one at a time
    bm, cache = llm.engine.block_manager, llm.engine.runner.kv_cache
    for tokens in (long[:32], short + decoded[:12]):
        block = bm.pools["swa"].lookup(bm.hash_blocks([], tokens)[1])  # ends at position 32
        assert block is not None
        want = _cold_state(path, tokens)
        for key, rows in want.items():
            for mine, theirs in zip(cache.boundaries[key], rows):
                assert rel_err(mine[:, block], theirs) <= 1e-12, key
        slot = 3  # loading puts them where the pooling reads them
        cache.load_boundaries([slot], [block])
        for key, rows in want.items():
            for state, theirs in zip(cache.states[key], rows):
                assert rel_err(state[:, slot, :4, :theirs.shape[-1]], theirs) <= 1e-12


def test_cache_salt_keeps_tenants_apart(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint(tiny_config()))
    prompt = prompts_of([40], seed=19)[0]

    def cached(salt):
        params = SamplingParams(max_tokens=1, cache_salt=salt)
        return llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].num_cached_tokens

    assert [cached(None), cached("a"), cached("a"), cached("b"), cached(None)] == \
        [0, 0, 32, 0, 32]
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")
