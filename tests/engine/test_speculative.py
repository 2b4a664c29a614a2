"""MTP speculative decoding through the engine: outputs equal the non-speculative engine's.

Greedy outputs must be token for token those without speculation, whatever the drafts: the
MTP block's own (a random tiny model: almost none accepted), drafts forced wrong (none
accepted) and drafts forced right (the target's own greedy tokens: all accepted, fewer steps).
Mixed batches of prompts, chunked prefill and preemption, fp64 with the QAT rounding on (the
exact mode, so batch shapes cannot flip a token). Sampling keeps the target's distribution
(chi-square, both at the verifier and through the engine), and the MTP drafts are what the
MTP block computes over the whole sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import rel_err, tiny_config
from dsv4 import SamplingParams
from dsv4.engine import scheduler as sched_mod
from dsv4.engine.rejection_sampler import RejectionSampler, VerifyLayout
from dsv4.engine.sampler import SamplingMetadata
from test_llm_engine import (EXACT, GREEDY, TIGHT_EXACT, make_llm,  # noqa: F401 (fixture)
                             preemptions, prompts_of)
from test_speculative_rollback import live_rows


# the plan of TIGHT_EXACT (4 slots, ~11 usable csa/hca blocks for four ~60-token requests)
# once the swa blocks also hold the MTP layer's window
SPEC_TIGHT = dict(TIGHT_EXACT, kv_cache_memory=1_500_000)


def spec(k: int) -> dict:
    return {"speculative_config": {"method": "mtp", "num_speculative_tokens": k}}


def outputs(llm, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs]


class Drafts:
    """A draft_override hook: the target's own greedy continuation ("right"), a token that is
    never it ("wrong"), or the first ``keep`` of the right ones then wrong ones ("partial")."""

    def __init__(self, prompts, reference, mode: str, keep: int = 1) -> None:
        self.ref = {tuple(p): o for p, o in zip(prompts, reference)}
        self.mode, self.keep = mode, keep

    def __call__(self, request_id, so_far, proposed):
        for prompt, out in self.ref.items():
            if tuple(so_far[:len(prompt)]) == prompt:
                done = len(so_far) - len(prompt)
                right = (out[done:done + len(proposed)] + [0] * len(proposed))[:len(proposed)]
                wrong = [(t + 1) % 512 for t in right]
                if self.mode == "right":
                    return right
                if self.mode == "wrong":
                    return wrong
                return right[:self.keep] + wrong[self.keep:]
        raise AssertionError("unknown request")


class StepCounter:
    def __init__(self, llm) -> None:
        self.n, real = 0, llm.engine.step

        def step():
            self.n += 1
            return real()

        llm.engine.step = step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dsv4.model.writer import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("spec") / "ckpt", tiny_config(index_topk=2),
                            tokenizer=False)


@pytest.fixture(scope="module")
def greedy_reference(checkpoint):
    prompts = prompts_of([30, 25, 40, 35], seed=5)
    params = SamplingParams(max_tokens=20, **GREEDY)
    return prompts, params, outputs(make_llm(checkpoint, **EXACT), prompts, params)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drafts", ["mtp", "wrong", "right", "partial"])
def test_greedy_outputs_equal_without_speculation(checkpoint, greedy_reference, preemptions,
                                                  k, drafts):
    """Tight cache (preemption) and small chunks (chunked prefill), one batch of four."""
    prompts, params, want = greedy_reference
    llm = make_llm(checkpoint, **SPEC_TIGHT, **EXACT, **spec(k))
    if drafts != "mtp":
        llm.engine.runner.draft_override = Drafts(prompts, want, drafts)
    assert outputs(llm, prompts, params) == want
    assert preemptions["n"] > 0
    stats = llm.engine.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_draft_tokens > 0
    if drafts == "wrong":
        assert stats.spec_accepted_tokens == 0
    if drafts == "right":
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
    if drafts == "partial":
        assert stats.spec_accepted_per_position[0] == stats.spec_num_drafts
        assert sum(stats.spec_accepted_per_position[1:]) == 0
    assert llm.engine.block_manager.all_free()


@pytest.mark.parametrize("k", [1, 3])
def test_forced_right_drafts_cut_the_steps(checkpoint, greedy_reference, k):
    """One request, 20 tokens: k + 1 tokens a step once drafting starts."""
    prompts, params, want = greedy_reference
    plain = make_llm(checkpoint, **EXACT)
    count_plain = StepCounter(plain)
    assert outputs(plain, prompts[:1], params) == want[:1]
    llm = make_llm(checkpoint, **EXACT, **spec(k))
    llm.engine.runner.draft_override = Drafts(prompts, want, "right")
    count = StepCounter(llm)
    assert outputs(llm, prompts[:1], params) == want[:1]
    prefill = math.ceil(30 / 48)  # the prompt's steps (its last one samples the first token)
    assert count_plain.n == prefill + 19
    assert count.n == prefill + math.ceil(19 / (k + 1))


def test_mtp_drafts_are_the_blocks_greedy_tokens(checkpoint):
    """The engine's first drafts (k = 1) equal the argmax of the MTP block run over the whole
    sequence with the model's own (SequenceCache) path, at every step."""
    prompt = prompts_of([21], seed=9)[0]
    llm = make_llm(checkpoint, **EXACT, **spec(1))
    seen = []
    llm.engine.runner.draft_override = lambda rid, so_far, proposed: (
        seen.append((list(so_far), list(proposed))) or proposed)
    out = outputs(llm, [prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    model = llm.engine.model
    tokens = prompt + out
    cache = model.new_cache()
    h = model.hidden_streams(torch.tensor([tokens]), cache)
    n = len(tokens)
    drafts = model.mtp_logits(h[:, :n - 1], torch.tensor([tokens[1:]]), 0, cache)[0].argmax(-1)
    assert len(seen) >= 6
    for so_far, proposed in seen:
        # the draft proposed after seeing so_far predicts the token after the next one
        assert proposed == [int(drafts[len(so_far) - 2])]


def test_state_after_rollbacks_equals_a_run_without_drafts(checkpoint, greedy_reference):
    """Half-right drafts (one accepted of three each step): every step rolls back, windows
    complete inside rejected drafts; the compressor state the next token reads equals the
    plain engine's after the same tokens."""
    prompts, params, want = greedy_reference
    states = {}

    def capture(llm, tag):
        eng = llm.engine
        real = eng.scheduler.update_from_output

        def update(batch, sampled, *args, **kw):
            out = real(batch, sampled, *args, **kw)
            req = eng.scheduler.requests.get("0")
            if req is not None and req.num_computed_tokens == req.num_tokens - 1:
                slot = eng.block_manager.state_slot("0")
                states.setdefault(tag, {})[req.num_computed_tokens] = {
                    key: [t[:, slot].clone() for t in pair]
                    for key, pair in eng.runner.kv_cache.states.items()}
            return out

        eng.scheduler.update_from_output = update

    plain = make_llm(checkpoint, **EXACT)
    capture(plain, "plain")
    outputs(plain, prompts[:1], params)
    llm = make_llm(checkpoint, **EXACT, **spec(3))
    llm.engine.runner.draft_override = Drafts(prompts, want, "partial")
    capture(llm, "spec")
    assert outputs(llm, prompts[:1], params) == want[:1]
    cfg = tiny_config()
    dims = {"csa": cfg.head_dim, "csa_index": cfg.index_head_dim, "hca": cfg.head_dim}
    common = sorted(set(states["plain"]) & set(states["spec"]))
    assert len(common) >= 8  # every verifying step: 2 tokens a step
    for pos in common:
        got = live_rows(states["spec"][pos], pos, cfg.hca_ratio, dims)
        ref = live_rows(states["plain"][pos], pos, cfg.hca_ratio, dims)
        for key in ref:
            for mine, theirs in zip(got[key], ref[key]):
                if theirs.numel():
                    assert rel_err(mine, theirs) <= 1e-12, (pos, key)


def test_stops_inside_accepted_drafts(checkpoint, greedy_reference):
    """A stop token id, EOS and max_tokens reached in the middle of accepted drafts end the
    output exactly where the plain engine ends it; min_tokens holds back a stop."""
    prompts, _, want = greedy_reference
    stop = want[0][6]
    cases = [SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop]),
             SamplingParams(max_tokens=7, **GREEDY),
             SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop],
                            min_tokens=9)]
    for params in cases:
        ref = outputs(make_llm(checkpoint, **EXACT), prompts[:1], params)
        llm = make_llm(checkpoint, **EXACT, **spec(3))
        llm.engine.runner.draft_override = Drafts(prompts, want, "right")
        assert outputs(llm, prompts[:1], params) == ref
    eos = make_llm(checkpoint, **EXACT, **spec(3))
    eos.engine.eos_token_id = stop
    llm_ref = make_llm(checkpoint, **EXACT)
    llm_ref.engine.eos_token_id = stop
    params = SamplingParams(max_tokens=20, temperature=0.0)
    eos.engine.runner.draft_override = Drafts(prompts, want, "right")
    assert outputs(eos, prompts[:1], params) == outputs(llm_ref, prompts[:1], params)
    assert outputs(eos, prompts[:1], params)[0][-1] == stop


def test_logprobs_of_accepted_tokens(checkpoint, greedy_reference):
    """Each accepted token's logprob and top-N are the target's, as without speculation."""
    prompts, _, want = greedy_reference
    params = SamplingParams(max_tokens=10, logprobs=3, **GREEDY)
    ref = make_llm(checkpoint, **EXACT).generate(prompt_token_ids=prompts[:2],
                                                 sampling_params=params)
    llm = make_llm(checkpoint, **EXACT, **spec(2))
    llm.engine.runner.draft_override = Drafts(prompts, want, "partial")
    got = llm.generate(prompt_token_ids=prompts[:2], sampling_params=params)
    for a, b in zip(got, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].logprobs) == len(b.outputs[0].logprobs) == 10
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert (x.token_id, x.rank) == (y.token_id, y.rank)
            assert abs(x.logprob - y.logprob) <= 1e-9
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top, y.top)) <= 1e-9


def test_prefix_cache_and_abort_with_speculation(checkpoint, greedy_reference):
    """A second pass over the same prompts hits the prefix cache and decodes the same tokens;
    an aborted speculating request frees everything."""
    prompts, params, want = greedy_reference
    llm = make_llm(checkpoint, **EXACT, **spec(2))
    assert outputs(llm, prompts, params) == want
    assert outputs(llm, prompts, params) == want
    assert llm.engine.stats().prefix_cache_hits > 0
    eng = llm.engine
    eng.add_request("x", prompts[0], SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(4):
        eng.step()
    assert eng.scheduler.requests["x"].spec_token_ids
    eng.abort_request("x")
    assert eng.block_manager.all_free() or not eng.has_unfinished_requests()
    assert not eng.has_unfinished_requests()


# ---- sampling: the target distribution is kept -------------------------------------------

def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells with expected count >= 5, and its degrees."""
    expected = probs * counts.sum()
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def chi2_limit(dof: int) -> float:
    """About the 99.9th percentile of chi-square(dof) (Wilson-Hilferty)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("draft", [0, 2, 5])
def test_rejection_sampler_keeps_the_target_distribution(draft):
    """20,000 rows of one distribution with one draft each (likely, unlikely, masked by
    top-p): the first token is distributed as the target's processed distribution (top-p 0.9,
    temperature 0.8, a presence penalty on token 1), by a chi-square test."""
    vocab, n = 12, 20_000
    torch.manual_seed(0)
    base = torch.randn(vocab, dtype=torch.float64) * 1.5
    params = SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.7, seed=None)
    layout = VerifyLayout([[draft]] * n)
    meta = SamplingMetadata.build([params] * (2 * n), "cpu",
                                  output_token_ids=[[1]] * (2 * n),
                                  prompt_token_ids=[[0]] * (2 * n), vocab_size=vocab)
    meta.step_seed = 1234
    logits = base.float().expand(2 * n, vocab).clone()
    tokens, _ = RejectionSampler()(logits, meta, layout)
    first = torch.tensor([t[0] for t in tokens])
    one = SamplingMetadata.build([params], "cpu", output_token_ids=[[1]],
                                 prompt_token_ids=[[0]], vocab_size=vocab)
    sampler = RejectionSampler().sampler
    target = sampler.probabilities(sampler.process(logits[:1].clone(), one), one)[0]
    counts = torch.bincount(first, minlength=vocab).double()
    stat, dof = chi_square(counts, target.double())
    assert stat < chi2_limit(dof), (stat, dof)
    assert counts[target == 0].sum() == 0  # nothing outside top-p
    accepted = sum(len(t) == 2 for t in tokens) / n
    assert abs(accepted - target[draft].item()) < 0.02


def test_sampling_distribution_through_the_engine(tmp_path):
    """A 16-token vocabulary: the second output token of 600 seeded samples with top-p and a
    repetition penalty, with speculation (its draft forced to one token: accepted sometimes,
    rejected sometimes) against without: a two-sample chi-square test."""
    from dsv4.model.writer import write_checkpoint

    path = write_checkpoint(tmp_path / "small", tiny_config(vocab_size=16, index_topk=2),
                            tokenizer=False)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    n = 600

    def second_tokens(llm) -> torch.Tensor:
        params = [SamplingParams(max_tokens=3, temperature=1.0, top_p=0.95,
                                 repetition_penalty=1.3, seed=s, ignore_eos=True)
                  for s in range(n)]
        outs = llm.generate(prompt_token_ids=[prompt] * n, sampling_params=params)
        return torch.tensor([o.outputs[0].token_ids[1] for o in outs])

    plain = second_tokens(make_llm(path, max_num_seqs=64, max_num_batched_tokens=640))
    llm = make_llm(path, max_num_seqs=64, max_num_batched_tokens=640, **spec(1))
    llm.engine.runner.draft_override = lambda rid, so_far, proposed: [6]
    with_spec = second_tokens(llm)
    stats = llm.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    a = torch.bincount(plain, minlength=16).double()
    b = torch.bincount(with_spec, minlength=16).double()
    keep = (a + b) >= 10
    total = a + b
    ea, eb = total * a.sum() / (2 * n), total * b.sum() / (2 * n)
    stat = (((a - ea) ** 2 / ea + (b - eb) ** 2 / eb)[keep]).sum().item()
    assert stat < chi2_limit(int(keep.sum()) - 1), stat


@pytest.mark.parametrize("bad, message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be one of"),
    ('{"method": "mtp", "num_speculative_tokens": 0}', r"num_speculative_tokens must be"),
    ('{"method": "mtp"}', r"num_speculative_tokens must be"),
    ('{"method": "mtp", "num_speculative_tokens": 2, "draft": 1}', "unknown field"),
    ('{"method": "dspark", "num_speculative_tokens": 1}', "DSpark"),
    ("mtp", "not valid JSON"),
])
def test_bad_speculative_configs_are_named(bad, message):
    from dsv4.engine_args import EngineArgs

    with pytest.raises(ValueError, match=message):
        EngineArgs(speculative_config=bad)
    assert EngineArgs(speculative_config='{"num_speculative_tokens": 3}').speculative_config \
        == {"method": "mtp", "num_speculative_tokens": 3}


def test_a_checkpoint_without_mtp_cannot_speculate(tmp_path):
    from dsv4.model.writer import write_checkpoint

    path = write_checkpoint(tmp_path / "nomtp", tiny_config(num_nextn_predict_layers=0),
                            tokenizer=False)
    with pytest.raises(ValueError, match="MTP block"):
        make_llm(path, **spec(1))


def test_grammar_rows_speculate_too(checkpoint):
    """A request under a grammar gets drafts like any other (each verified position gets its
    own mask: test_speculative_grammar.py)."""
    from dsv4.structured_outputs import StructuredOutputsParams

    llm = make_llm(checkpoint, **spec(2))
    sched = llm.engine.scheduler
    free = SamplingParams(max_tokens=4, **GREEDY)
    bound = SamplingParams(max_tokens=4, temperature=0.0,
                           structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    for rid, params in (("free", free), ("bound", bound)):
        sched.add_request(sched_mod.Request(rid, [1, 2, 3], params))
    batch = sched.schedule()
    assert dict(zip(batch.req_ids, batch.num_propose_tokens)) == {"free": 2, "bound": 2}


def test_seeded_sampling_gives_the_same_tokens_with_drafts(checkpoint, greedy_reference):
    """Each verified position samples with the noise of its output index, and a draft is
    accepted only where it equals that sample: a seeded request (top-p, penalties) gives the
    tokens it gives without speculation (fp64: the same logits in any batch shape)."""
    prompts = greedy_reference[0][:2]
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, presence_penalty=0.4,
                             repetition_penalty=1.1, seed=s, ignore_eos=True) for s in (3, 4)]
    want = outputs(make_llm(checkpoint, **EXACT), prompts, params)
    for drafts in ("mtp", "partial"):  # partial: the first draft is the seeded sample
        llm = make_llm(checkpoint, **EXACT, **spec(2))
        if drafts == "partial":
            llm.engine.runner.draft_override = Drafts(prompts, want, "partial")
        assert outputs(llm, prompts, params) == want
    stats = llm.engine.stats()
    assert stats.spec_accepted_per_position[0] == stats.spec_num_drafts > 0
