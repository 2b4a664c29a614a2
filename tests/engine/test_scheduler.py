"""Scheduler with a mock model loop: chunked prefill, budgets, preemption, abort, stops."""

from __future__ import annotations

import math
import pickle
import random
from collections import defaultdict

import pytest
from conftest import tiny_config

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.spec import build_cache_specs
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.request import Request, RequestStatus
from dsv4.engine.scheduler import Scheduler
from dsv4.sampling_params import SamplingParams

B, W, EOS = 16, 8, 1


def next_token(tokens: list[int]) -> int:
    """The mock model: a deterministic function of the whole sequence, never EOS."""
    return 2 + sum(t * (i + 1) for i, t in enumerate(tokens)) % 97


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class MockRunner:
    """Keeps its own copy of each request's 'KV' (the tokens fed so far) and checks the batch."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.cache: dict[str, list[int]] = {}
        self.batches: list[ScheduledBatch] = []

    def execute(self, batch: ScheduledBatch) -> list[list[int]]:
        config = self.scheduler.config
        self.batches.append(batch)
        assert batch.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert batch.num_reqs <= config.max_num_seqs
        assert len(self.scheduler.running) <= config.max_num_seqs
        for rid in batch.finished_req_ids + batch.preempted_req_ids:
            self.cache.pop(rid, None)
        seen: dict[str, set[int]] = defaultdict(set)
        out = []
        for i, rid in enumerate(batch.req_ids):
            start, tokens = batch.num_computed_tokens[i], batch.token_ids[i]
            if start == 0:
                self.cache[rid] = []
            assert len(self.cache[rid]) == start, "tokens must continue the cached prefix"
            self.cache[rid].extend(tokens)
            end = start + len(tokens)
            for kind in ("csa", "hca"):
                table = batch.block_tables[kind][i]
                assert len(table) >= math.ceil(end / B)
                assert not seen[kind] & set(table), "a block in two running requests"
                seen[kind] |= set(table)
            offset, swa = batch.swa_block_offsets[i], batch.block_tables["swa"][i]
            assert offset * B <= max(0, start - W + 1)  # the window of the first new token
            assert (offset + len(swa)) * B >= end
            assert not seen["swa"] & set(swa)
            seen["swa"] |= set(swa)
            assert batch.state_slots[i] not in seen["state"]
            seen["state"].add(batch.state_slots[i])
            is_last = end == len(batch.prompt_token_ids[i]) + len(batch.output_token_ids[i])
            assert batch.do_sample[i] == is_last
            out.append([next_token(self.cache[rid])] if batch.do_sample[i] else [])
        return out


def make_scheduler(swa=64, csa=64, hca=64, slots=8, long_prefill_token_threshold=None,
                   **engine) -> Scheduler:
    kw = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32, block_size=B)
    kw.update(engine)
    specs = build_cache_specs(tiny_config(), "bf16")
    bm = BlockManager(specs, B, {"swa": swa, "csa": csa, "hca": hca}, slots)
    return Scheduler(EngineConfig(**kw), bm, long_prefill_token_threshold)


def add(sched: Scheduler, rid: str, prompt_len: int, max_tokens: int, seed: int = 0,
        **params) -> Request:
    rng = random.Random(f"{rid}-{seed}")
    prompt = [rng.randrange(2, 100) for _ in range(prompt_len)]
    req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), EOS)
    sched.add_request(req)
    return req


def run(sched: Scheduler, runner: MockRunner, max_steps: int = 5000, before_update=None):
    outputs: dict[str, list[int]] = defaultdict(list)
    reasons: dict[str, str] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        batch = sched.schedule()
        assert not batch.is_empty, "no progress with unfinished requests"
        sampled = runner.execute(batch)
        if before_update is not None:
            for out in before_update(batch):
                reasons[out.request_id] = out.finish_reason
        for out in sched.update_from_output(batch, sampled):
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert not sched.has_unfinished_requests()
    return outputs, reasons


def test_chunked_prefill_mixed_with_decodes():
    sched = make_scheduler()
    runner = MockRunner(sched)
    a = add(sched, "a", 10, 20)
    batch = sched.schedule()
    assert batch.req_ids == ["a"] and batch.num_scheduled_tokens == [10]
    assert batch.do_sample == [True]
    sched.update_from_output(batch, runner.execute(batch))
    b = add(sched, "b", 100, 5)
    chunks = []
    while b.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch.req_ids == ["a", "b"]  # running first, then the newcomer
        assert batch.num_scheduled_tokens[0] == 1 and batch.do_sample[0]  # a decodes
        assert batch.total_num_scheduled_tokens <= 32
        chunks.append(batch.num_scheduled_tokens[1])
        assert batch.do_sample[1] == (sum(chunks) == 100)
        assert batch.positions()[:1] == [a.num_computed_tokens - 1]
        assert batch.logits_indices()[0] == 0
        sched.update_from_output(batch, runner.execute(batch))
    assert chunks == [31, 31, 31, 7]
    outputs, reasons = run(sched, runner)
    assert a.output_token_ids == reference(a.prompt_token_ids, 20)
    assert b.output_token_ids == reference(b.prompt_token_ids, 5)
    assert reasons == {"a": "length", "b": "length"}
    assert sched.block_manager.all_free()


def test_budget_and_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    runner = MockRunner(sched)
    reqs = [add(sched, f"r{i}", 5 + 7 * i, 4 + i) for i in range(7)]
    outputs, reasons = run(sched, runner)
    assert max(b.num_reqs for b in runner.batches) == 3
    assert max(b.total_num_scheduled_tokens for b in runner.batches) == 20
    for req in reqs:
        assert outputs[req.request_id] == reference(req.prompt_token_ids,
                                                    req.sampling_params.max_tokens)
        assert req.status == RequestStatus.FINISHED_LENGTH
    assert sched.block_manager.all_free()


def test_preemption_when_blocks_run_out():
    # 8 usable csa/hca blocks = 128 tokens for everyone; each request grows to 5 blocks
    sched = make_scheduler(swa=16, csa=9, hca=9, slots=8)
    runner = MockRunner(sched)
    reqs = [add(sched, f"r{i}", 30 + 4 * i, 36) for i in range(6)]
    outputs, reasons = run(sched, runner)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert any(b.preempted_req_ids for b in runner.batches)
    for req in reqs:
        assert outputs[req.request_id] == reference(req.prompt_token_ids, 36)
        assert reasons[req.request_id] == "length"
    assert sched.block_manager.all_free()


def test_preempted_request_comes_back_first():
    sched = make_scheduler(swa=16, csa=5, hca=5, max_num_batched_tokens=64)
    runner = MockRunner(sched)
    old = add(sched, "old", 30, 30)
    new = add(sched, "new", 30, 30)
    preempted = None
    while preempted is None:
        batch = sched.schedule()
        if batch.preempted_req_ids:
            preempted = batch.preempted_req_ids[0]
        sched.update_from_output(batch, runner.execute(batch))
    assert preempted == "new"  # the latest admitted goes first
    later = add(sched, "later", 4, 4)
    assert list(sched.waiting) == [new, later]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_output_tokens > 0  # recompute covers prompt + output so far
    run(sched, runner)
    for req in (old, new, later):
        assert req.output_token_ids == reference(req.prompt_token_ids,
                                                 req.sampling_params.max_tokens)
    assert sched.block_manager.all_free()


def test_abort_at_any_time():
    rng = random.Random(1)
    sched = make_scheduler(swa=24, csa=12, hca=12, slots=4, max_num_seqs=4)
    runner = MockRunner(sched)
    reqs = {f"r{i}": add(sched, f"r{i}", rng.randrange(3, 60), rng.randrange(2, 30))
            for i in range(12)}
    aborted = set()

    def maybe_abort(batch):  # between schedule() and update_from_output(): mid-step
        outs = []
        if rng.random() < 0.3 and sched.requests:
            rid = rng.choice(sorted(sched.requests))
            aborted.add(rid)
            outs = sched.abort_requests(rid)
            assert outs[0].finished and outs[0].finish_reason == "abort"
        return outs

    # abort one while waiting, one mid-prefill, then randomly mid-step
    early = sched.abort_requests(["r11", "unknown"])
    assert [o.request_id for o in early] == ["r11"]
    batch = sched.schedule()
    first_outputs = sched.update_from_output(batch, runner.execute(batch))
    partial = next(r for r in sched.running if r.num_computed_tokens < r.num_tokens)
    early += sched.abort_requests(partial.request_id)
    aborted |= {"r11", partial.request_id}
    outputs, reasons = run(sched, runner, before_update=maybe_abort)
    for out in first_outputs:
        outputs[out.request_id][:0] = out.new_token_ids
    reasons.update({o.request_id: o.finish_reason for o in early})
    assert len(aborted) > 2 and set(reasons) == set(reqs)
    for rid, req in reqs.items():
        ref = reference(req.prompt_token_ids, req.sampling_params.max_tokens)
        if rid in aborted:
            assert reasons[rid] == "abort" and req.status == RequestStatus.FINISHED_ABORTED
            assert req.output_token_ids == ref[:req.num_output_tokens]
        else:
            assert reasons[rid] == "length" and outputs[rid] == ref
    assert sched.block_manager.all_free()
    assert sched.abort_requests("r0") == []  # finished ids are ignored


class ScriptedRunner:
    def __init__(self, script: list[int]) -> None:
        self.script = list(script)

    def execute(self, batch):
        return [[self.script.pop(0)] if s else [] for s in batch.do_sample]


@pytest.mark.parametrize("params, script, expected, reason, stop_reason", [
    (dict(max_tokens=10), [5, 6, EOS, 7], [5, 6, EOS], "stop", None),
    (dict(max_tokens=4, ignore_eos=True), [5, EOS, 6, EOS, 7], [5, EOS, 6, EOS], "length", None),
    (dict(max_tokens=10, stop_token_ids=[42]), [5, 42, 6], [5, 42], "stop", 42),
    (dict(max_tokens=3), [5, 6, 7, 8], [5, 6, 7], "length", None),
    (dict(max_tokens=None), [5] * 20, [5] * 6, "length", None),  # max_model_len = 16
    # before min_tokens neither EOS nor a stop id ends the request (forced tokens included)
    (dict(max_tokens=10, min_tokens=3, stop_token_ids=[42]), [EOS, 42, 5, 42, 6],
     [EOS, 42, 5, 42], "stop", 42),
    (dict(max_tokens=None, min_tokens=9), [EOS] * 20, [EOS] * 6, "length", None),
])
def test_stop_conditions(params, script, expected, reason, stop_reason):
    sched = make_scheduler(max_model_len=16)
    req = Request("r", list(range(2, 12)), SamplingParams(**params), EOS)
    sched.add_request(req)
    runner = ScriptedRunner(script)
    outputs, reasons = run(sched, runner)
    assert outputs["r"] == expected and reasons["r"] == reason
    assert req.stop_reason == stop_reason
    assert sched.block_manager.all_free()


def test_stop_string_hook_and_multi_token_update():
    sched = make_scheduler()
    req = add(sched, "r", 5, 10)
    batch = sched.schedule()
    # a runner may return several tokens for a row (speculative decoding): stop at EOS
    outs = sched.update_from_output(batch, [[7, EOS, 9]])
    assert outs[0].new_token_ids == [7, EOS] and outs[0].finish_reason == "stop"
    req2 = add(sched, "s", 5, 10)
    batch = sched.schedule()
    sched.update_from_output(batch, [[7]])
    # the detokenizer saw a stop string in the text so far
    outs = sched.finish_requests("s", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert outs[0].finish_reason == "stop" and req2.stop_reason == "###"
    assert req.is_finished and req2.is_finished and sched.block_manager.all_free()
    batch = sched.schedule()
    assert batch.is_empty and batch.finished_req_ids == ["s"]  # "r" went out with the last one
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("x", RequestStatus.RUNNING)


def test_rejects_bad_requests_and_outputs():
    sched = make_scheduler(csa=4, hca=4, max_model_len=256)  # 3 usable blocks = 48 tokens
    add(sched, "a", 10, 4)
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "a", 10, 4)
    with pytest.raises(ValueError, match="never fit"):
        add(sched, "big", 40, 20)
    batch = sched.schedule()
    with pytest.raises(ValueError, match="sampled rows"):
        sched.update_from_output(batch, [])
    with pytest.raises(ValueError, match="should have sampled"):
        sched.update_from_output(batch, [[]])


def test_batch_is_picklable():
    sched = make_scheduler()
    add(sched, "a", 20, 4, temperature=0.7, seed=3)
    add(sched, "b", 3, 4)
    batch = sched.schedule()
    clone = pickle.loads(pickle.dumps(batch))
    assert clone == batch
    assert clone.positions() == list(range(20)) + list(range(3))
    assert clone.sample_indices == [0, 1] and clone.logits_indices() == [19, 22]


# ---- fairness: a short request is not stuck behind a long prefill -------------------------------
@pytest.mark.parametrize("threshold", [None, 64])  # None: the default (half); 64: the old order
def test_short_request_during_long_prefill(threshold):
    sched = make_scheduler(max_model_len=512, max_num_batched_tokens=64,
                           long_prefill_token_threshold=threshold)
    runner = MockRunner(sched)
    long = add(sched, "long", 300, 2)
    batch = sched.schedule()
    assert batch.num_scheduled_tokens == [64]  # alone, a long prefill takes the whole budget
    sched.update_from_output(batch, runner.execute(batch))
    short = add(sched, "short", 2, 3)
    steps = 0
    while short.num_output_tokens == 0:
        batch = sched.schedule()
        steps += 1
        assert "long" in batch.req_ids  # the long prefill advances every step
        sched.update_from_output(batch, runner.execute(batch))
    if threshold is None:
        assert steps == 1 and batch.req_ids == ["long", "short"]
        assert batch.num_scheduled_tokens == [62, 2] and batch.do_sample == [False, True]
    else:  # old order: the short one waits until the last chunk of the long prompt
        assert steps == 4 and long.num_output_tokens == 1
    run(sched, runner)
    for req in (long, short):
        assert req.output_token_ids == reference(req.prompt_token_ids,
                                                 req.sampling_params.max_tokens)


def test_short_request_behind_a_waiting_long_one():
    sched = make_scheduler(max_model_len=512, max_num_batched_tokens=64)
    runner = MockRunner(sched)
    add(sched, "long", 300, 2)
    add(sched, "short", 5, 2)
    batch = sched.schedule()  # FCFS admission, but the long head takes at most half at first
    assert batch.req_ids == ["long", "short"] and batch.num_scheduled_tokens == [59, 5]
    assert batch.do_sample == [False, True]
    sched.update_from_output(batch, runner.execute(batch))
    batch = sched.schedule()
    assert batch.req_ids == ["long", "short"] and batch.num_scheduled_tokens == [63, 1]


@pytest.mark.parametrize("budget", [24, 8])  # 8: decodes + half the budget can exceed it
def test_decodes_first_prefills_advance_budget_kept(budget):
    """Random arrivals of short and long prompts: every step schedules every decode before any
    prefill chunk, the oldest unfinished prefill advances, the budget is never exceeded (the
    MockRunner checks), and every output is right."""
    rng = random.Random(5)
    sched = make_scheduler(swa=128, csa=128, hca=128, slots=8, max_model_len=512,
                           max_num_seqs=6, max_num_batched_tokens=budget)
    runner = MockRunner(sched)
    arrivals = sorted((rng.randrange(40), i) for i in range(24))
    reqs, step, full, mixed = [], 0, 0, 0
    while arrivals or sched.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            n = rng.choice([1, 2, 3, 5, 80, 150])
            reqs.append(add(sched, f"r{i}", n, rng.randrange(1, 12)))
        step += 1
        left = {r.request_id: r.num_tokens - r.num_computed_tokens for r in sched.running}
        decoding = {rid for rid, n in left.items() if n == 1}
        prefilling = [rid for rid, n in left.items() if n > 1]  # admission order
        batch = sched.schedule()
        assert not batch.preempted_req_ids
        assert decoding <= set(batch.req_ids)
        if prefilling:
            assert prefilling[0] in batch.req_ids
        in_batch = set(batch.req_ids)  # rows in admission order
        assert batch.req_ids == [r.request_id for r in sched.running if r.request_id in in_batch]
        full += batch.total_num_scheduled_tokens == budget
        mixed += bool(decoding) and bool(prefilling) and len(in_batch - decoding) > 1
        sched.update_from_output(batch, runner.execute(batch))
        assert step < 1000
    assert len(reqs) == 24 and sched.block_manager.all_free()
    assert full > 10 and mixed > 10  # the budget was contended
    for req in reqs:
        assert req.output_token_ids == reference(req.prompt_token_ids,
                                                 req.sampling_params.max_tokens)


def test_decodes_go_before_prefill_chunks():
    sched = make_scheduler(max_num_batched_tokens=12)
    runner = MockRunner(sched)
    for rid, n in (("p", 100), ("d1", 2), ("d2", 2), ("d3", 2)):
        add(sched, rid, n, 5)
    batch = sched.schedule()
    assert batch.num_scheduled_tokens == [6, 2, 2, 2]  # the long head took its half
    sched.update_from_output(batch, runner.execute(batch))
    sched.long_prefill_token_threshold = 12  # even a prefill allowed the whole budget
    batch = sched.schedule()  # comes after the decodes of the newer requests
    assert batch.req_ids == ["p", "d1", "d2", "d3"] and batch.num_scheduled_tokens == [9, 1, 1, 1]


def test_preemption_unschedules_a_decode_for_an_older_prefill():
    # 4 usable csa/hca blocks of 16 tokens: "p" (60 tokens) needs all of them to finish
    sched = make_scheduler(swa=64, csa=5, hca=5, max_num_batched_tokens=32)
    runner = MockRunner(sched)
    p = add(sched, "p", 60, 4)
    d = add(sched, "d", 2, 20)
    batch = sched.schedule()
    assert batch.req_ids == ["p", "d"] and batch.num_scheduled_tokens == [30, 2]
    sched.update_from_output(batch, runner.execute(batch))
    batch = sched.schedule()  # d decodes; p gets its share, the top-up finds no block
    assert batch.req_ids == ["p", "d"] and batch.num_scheduled_tokens == [16, 1]
    sched.update_from_output(batch, runner.execute(batch))
    batch = sched.schedule()  # p's last chunk needs d's block: d is unscheduled and preempted
    assert batch.req_ids == ["p"] and batch.num_scheduled_tokens == [14]
    assert batch.preempted_req_ids == ["d"] and d.status == RequestStatus.PREEMPTED
    sched.update_from_output(batch, runner.execute(batch))
    run(sched, runner)
    for req in (p, d):
        assert req.output_token_ids == reference(req.prompt_token_ids,
                                                 req.sampling_params.max_tokens)
    assert sched.block_manager.all_free()


def test_rejects_bad_threshold():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        make_scheduler(long_prefill_token_threshold=0)
