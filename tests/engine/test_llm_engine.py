"""The engine end to end on tiny checkpoints: paged cache, continuous batching, chunked prefill.

Checks that compare results across batch shapes (chunked vs full forward, alone vs batched,
roomy vs preempted) run in fp64 when the QAT rounding is on, and in fp32 only with it off: see
FP64_BOUND / FP32_BOUND in conftest.py and docs/architecture.md, "Numerics across batch shapes".
"""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_BOUND, FP64_BOUND, rel_err, tiny_config

from dsv4.engine.model_runner import ModelRunner
from dsv4.llm import LLM
from dsv4.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
EXACT = dict(dtype=torch.float64)  # the exact mode: batch-shape noise ~1e-16 (QAT rounding on)
# 4 state slots but only 11 usable csa/hca blocks: four ~60-token requests cannot all fit
# (prefix caching on, as by default: its swa blocks and CSA boundary state take their share)
TIGHT = dict(kv_cache_memory=660_000, max_model_len=80, max_num_seqs=4)
TIGHT_EXACT = dict(TIGHT, kv_cache_memory=2 * TIGHT["kv_cache_memory"])  # fp64: the same plan


def make_llm(path, **kw) -> LLM:
    args = dict(device="cpu", kv_cache_memory=32 << 20, max_model_len=256, block_size=16,
                max_num_batched_tokens=48)
    args.update(kw)
    return LLM(path, **args)


def prompts_of(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def record_logits(monkeypatch):
    """Capture the logits of every sampling row, per request, in step order."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = ModelRunner.execute

    def execute(self, batch):
        sampler = self.sampler

        def spy(logits, meta):
            for row, k in zip(batch.sample_indices, range(logits.shape[0])):
                seen.setdefault(batch.req_ids[row], []).append(logits[k].clone())
            return type(sampler).forward(sampler, logits, meta)

        self.sampler = spy
        try:
            return real(self, batch)
        finally:
            self.sampler = sampler

    monkeypatch.setattr(ModelRunner, "execute", execute)
    return seen


def test_greedy_batch_follows_transformers(tiny_checkpoint):
    """Each greedy token of a batch is transformers' argmax given the tokens before it, with its
    logprob and the top 3. Compared with teacher forcing (one transformers forward over our
    tokens) so that a near-tie, which fp32 noise between two implementations may order either
    way, cannot send the two token sequences apart."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(weight_dtype=None, expert_dtype=None, scale_fmt=None, index_topk=256)
    hf = cfg.to_hf_dict()
    path = tiny_checkpoint(cfg, extra_config={k: hf[k] for k in ("layer_types", "compress_rates")})
    llm = make_llm(path, emulate_quant=False)
    prompts = prompts_of([3, 29, 11, 40])
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=10, logprobs=3, **GREEDY))
    theirs = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # the two implementations agree to ~7e-7 of the largest logit (logprobs within ~5e-6): 1e-4
    # is the README's parity bound and leaves no room for a wrong token, logprob or position
    tol = 1e-4
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        assert len(got) == 10
        with torch.no_grad():
            logp = theirs(torch.tensor([prompt + got])).logits[0, len(prompt) - 1:-1]
        logp = logp.log_softmax(-1)
        for t, tl in enumerate(out.outputs[0].logprobs):
            assert tl.token_id == got[t]
            assert logp[t].max().item() - logp[t, got[t]].item() <= tol  # greedy, up to a tie
            assert abs(tl.logprob - logp[t, got[t]].item()) <= tol
            # values, not the id order: sorted values cannot flip on a near-tie
            want = logp[t].topk(3).values.tolist()
            assert all(abs(lp - w) <= tol for (_, lp), w in zip(tl.top, want))
            assert all(abs(lp - logp[t, i].item()) <= tol for i, lp in tl.top)


@pytest.mark.parametrize("budget,max_seqs", [(1, 8), (7, 2), (13, 8), (256, 8)])
def test_logits_match_full_forward_any_chunking(tiny_checkpoint, record_logits, budget,
                                                max_seqs):
    # fp32 with the QAT rounding off (the rounding-on case is the fp64 test below)
    cfg = tiny_config(index_topk=2)  # the indexer selects 2 of up to 14 entries
    llm = make_llm(tiny_checkpoint(cfg), emulate_quant=False, max_num_batched_tokens=budget,
                   max_num_seqs=max_seqs)
    prompts = prompts_of([5, 33, 18])
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=6, **GREEDY))
    model = llm.engine.model
    for prompt, out, rid in zip(prompts, outs, ("0", "1", "2")):
        seq = torch.tensor([prompt + out.outputs[0].token_ids[:-1]])
        full = model(seq)[0, len(prompt) - 1:]
        got = torch.stack(record_logits[out.request_id])
        assert got.shape == full.shape
        assert rel_err(got, full) <= FP32_BOUND


@pytest.mark.parametrize("seed", (1, 21, 26))
def test_fp64_logits_match_full_forward_any_batch(tiny_checkpoint, record_logits, seed):
    """QAT rounding on, indexer ties: fp32 missed 1e-5 on these checkpoints (batch-shape noise
    flips an FP8/FP4 rounding); an fp64 model with an fp64 cache matches the full forward for
    every chunking and batch mix."""
    torch.manual_seed(seed)
    path = tiny_checkpoint(tiny_config(index_topk=2), name=f"ck{seed}")
    prompts = prompts_of([5, 33, 18, 26], seed=seed)
    for budget, max_seqs in ((1, 8), (13, 2), (256, 8)):
        record_logits.clear()
        llm = make_llm(path, dtype=torch.float64, max_num_batched_tokens=budget,
                       max_num_seqs=max_seqs)
        assert llm.engine.config.kv_cache_dtype == "fp64"
        outs = llm.generate(prompt_token_ids=prompts,
                            sampling_params=SamplingParams(max_tokens=6, **GREEDY))
        for prompt, out in zip(prompts, outs):
            seq = torch.tensor([prompt + out.outputs[0].token_ids[:-1]])
            full = llm.engine.model(seq)[0, len(prompt) - 1:]
            assert rel_err(torch.stack(record_logits[out.request_id]), full) <= FP64_BOUND


def test_bf16_compressor_state_is_stored_and_pooled(tiny_checkpoint, record_logits):
    # QAT rounding off: with it on, values the bf16 windows move also cross FP8 boundaries
    # (up to 7.6e-3 over 8 checkpoints, too close to any bound to hold everywhere)
    llm = make_llm(tiny_checkpoint(tiny_config()), compressor_state_dtype="bf16",
                   max_num_batched_tokens=8, emulate_quant=False)
    assert {t.dtype for pair in llm.engine.runner.kv_cache.states.values() for t in pair} == \
        {torch.bfloat16}
    prompt = prompts_of([21])[0]
    out = llm.generate(prompt_token_ids=[prompt],
                       sampling_params=SamplingParams(max_tokens=9, **GREEDY))[0]
    seq = torch.tensor([prompt + out.outputs[0].token_ids[:-1]])
    full = llm.engine.model(seq)[0, len(prompt) - 1:]
    # bf16 windows alone: 4e-4 to 7e-4 over 8 checkpoints; fp32 everywhere else
    assert rel_err(torch.stack(record_logits[out.request_id]), full) <= 3e-3


def test_min_tokens_and_logit_bias(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint(tiny_config()))
    prompt = prompts_of([9])[0]

    def run(**kw) -> list[int]:
        params = SamplingParams(**{"max_tokens": 6, **GREEDY, **kw})
        return llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0] \
            .outputs[0].token_ids

    first = run()[0]
    assert run(stop_token_ids=[first]) == [first]  # the greedy first token ends it at once
    held = run(stop_token_ids=[first], min_tokens=4)  # ... unless min_tokens holds it off
    assert len(held) >= 4 and first not in held[:4]
    assert run(logit_bias={17: 100.0}, max_tokens=5) == [17] * 5


def test_generate_accepts_vllm_prompt_dicts(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint(tiny_config()))
    ids = prompts_of([7, 12])
    params = SamplingParams(max_tokens=3, **GREEDY)
    want = [o.outputs[0].token_ids
            for o in llm.generate(prompt_token_ids=ids, sampling_params=params)]
    got = llm.generate([{"prompt_token_ids": i} for i in ids], params)
    assert [o.outputs[0].token_ids for o in got] == want and got[1].prompt_token_ids == ids[1]
    # one prompt alone against the same prompt alone: a batch of two is another batch shape
    alone = llm.generate(prompt_token_ids=ids[:1], sampling_params=params)[0].outputs[0]
    assert llm.generate({"prompt_token_ids": ids[0]}, params)[0].outputs[0].token_ids == \
        alone.token_ids
    with pytest.raises(ValueError, match=r"prompts\[1\]: unsupported key"):
        llm.generate([{"prompt_token_ids": ids[0]}, {"multi_modal_data": {}}], params)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be text"):
        llm.generate([[1, 2, 3]], params)
    assert llm.engine.block_manager.all_free()


@pytest.mark.parametrize("budget, memory", [(256, None), (7, None), (48, TIGHT_EXACT)])
def test_prompt_logprobs_equal_full_forward(tiny_checkpoint, budget, memory):
    """Every prompt token after the first gets its log-softmax under the full forward, with its
    rank and the top-N, whatever the chunking; a preempted request does not repeat them. fp64
    with the QAT rounding on: equal ranks and top-N need logits that no batch shape moves."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    kw = dict(memory or {}, max_num_batched_tokens=budget, **EXACT)
    llm = make_llm(path, **kw)
    prompts = prompts_of([1, 33, 60, 57])
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        max_tokens=4, prompt_logprobs=3, **GREEDY))
    model = llm.engine.model
    for prompt, out in zip(prompts, outs):
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        if len(prompt) == 1:
            continue
        full = model(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
        for p, tl in enumerate(lps[1:]):
            assert tl.token_id == prompt[p + 1]
            # the logits leave the model as fp32: fp64's noise can move one by an fp32 ulp,
            # and a logprob (|logprob| < 16) by a few of its ulps (~1e-6 each)
            assert abs(tl.logprob - full[p, tl.token_id].item()) <= 4e-6
            assert tl.rank == int((full[p] > full[p, tl.token_id]).sum()) + 1
            assert [i for i, _ in tl.top] == full[p].topk(3).indices.tolist()
    assert llm.engine.block_manager.all_free() and not llm.engine._prompt_lps


def test_preemption_keeps_greedy_outputs(tiny_checkpoint):
    path = tiny_checkpoint(tiny_config(index_topk=2))
    prompts = prompts_of([30, 25, 40, 35])
    params = SamplingParams(max_tokens=24, **GREEDY)
    # fp64: 24 greedy steps over two batch histories must not meet a flipped FP8/FP4 rounding
    roomy = make_llm(path, **EXACT).generate(prompt_token_ids=prompts, sampling_params=params)
    tight = make_llm(path, **TIGHT_EXACT, **EXACT)
    outs = tight.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.block_manager.all_free()


@pytest.fixture
def preemptions(monkeypatch) -> dict[str, int]:
    """Counts the scheduler's preemptions during a test ({"n": count})."""
    from dsv4.engine import scheduler as sched_mod

    count = {"n": 0}
    real = sched_mod.Scheduler._preempt

    def spy(self, req):
        count["n"] += 1
        return real(self, req)

    monkeypatch.setattr(sched_mod.Scheduler, "_preempt", spy)
    return count


def test_tight_cache_really_preempts(tiny_checkpoint, preemptions):
    count = preemptions
    path = tiny_checkpoint(tiny_config())
    llm = make_llm(path, **TIGHT)
    outs = llm.generate(prompt_token_ids=prompts_of([30, 25, 40, 35]),
                        sampling_params=SamplingParams(max_tokens=24, **GREEDY))
    assert count["n"] > 0
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)


def test_blocks_free_after_finish_and_abort(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint())
    eng = llm.engine
    eng.add_request("a", prompts_of([20])[0], SamplingParams(max_tokens=50, **GREEDY))
    eng.add_request("b", prompts_of([9])[0], SamplingParams(max_tokens=3, **GREEDY))
    for i in range(2):  # n=2 as the processors fan it out: one engine request per completion
        eng.add_request(f"c-{i}", prompts_of([12])[0], SamplingParams(max_tokens=50, seed=i))
    for _ in range(4):
        eng.step()
    assert not eng.block_manager.all_free()
    eng.abort_request("a")
    eng.abort_request("c-0")
    eng.abort_request("c-1")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.all_free()


def test_seeded_request_same_alone_and_in_busy_batch(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint(), **EXACT)  # alone vs batched: the exact mode
    prompt = prompts_of([14])[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    others = prompts_of([7, 30, 22], seed=5)
    busy = llm.generate(prompt_token_ids=others + [prompt],
                        sampling_params=[SamplingParams(temperature=1.0, max_tokens=12)] * 3
                        + [params])[-1]
    assert busy.outputs[0].token_ids == alone.outputs[0].token_ids


def test_n_completions_and_stop_strings(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint())
    out = llm.generate(prompt_token_ids=prompts_of([6]),
                       sampling_params=SamplingParams(n=3, temperature=1.0, seed=7,
                                                      max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and out.finished
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # children get distinct seeds


@pytest.mark.parametrize("bad,match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_invalid_sampling_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_bad_requests_rejected_without_disturbing_others(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint())
    eng = llm.engine
    ok = prompts_of([10])[0]
    eng.add_request("ok", ok, SamplingParams(max_tokens=5, **GREEDY))
    tokens = [t for o in eng.step() for t in o.new_token_ids]
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request("x1", [], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length"):
        eng.add_request("x2", ok, SamplingParams(max_tokens=1000))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("x3", [1, 2, 512], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("ok", ok, SamplingParams())
    while eng.has_unfinished_requests():
        tokens += [t for o in eng.step() for t in o.new_token_ids]
    assert len(tokens) == 5
    assert eng.block_manager.all_free()


def test_fp8_cache_storage(tiny_checkpoint):
    """584-byte-style FP8 entries and FP4 indexer keys: with the reference's rounding on they
    hold the nope dims and keys exactly; only the rope dims are stored bf16, so logits move by
    ~1e-3 relative, not more."""
    path = tiny_checkpoint(tiny_config(index_topk=2))
    prompt = prompts_of([40])[0]
    logits, tokens = {}, {}
    for kv in ("fp32", "fp8"):
        llm = make_llm(path, kv_cache_dtype=kv)
        seen, sampler = [], llm.engine.runner.sampler

        def spy(lg, meta, seen=seen, sampler=sampler):
            seen.append(lg.clone())
            return sampler(lg, meta)

        llm.engine.runner.sampler = spy
        tokens[kv] = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            max_tokens=6, **GREEDY))[0].outputs[0].token_ids
        logits[kv] = torch.stack(seen)
        assert llm.engine.block_manager.all_free()
    assert llm.engine.runner.kv_cache.swa.dtype == torch.uint8
    # ~1e-3 apart, the two runs may pick different greedy tokens at a near-tie: compare the
    # steps up to and including the first that differs (the ones with the same context)
    same = next((i for i, (a, b) in enumerate(zip(tokens["fp8"], tokens["fp32"])) if a != b), 5)
    err = rel_err(logits["fp8"][:same + 1], logits["fp32"][:same + 1])
    assert 0 < err <= 1e-2


def test_engine_reports_cache_figures(tiny_checkpoint):
    info = make_llm(tiny_checkpoint()).engine.cache_info()
    assert info["memory_bytes"] <= 32 << 20 and info["num_state_slots"] >= 1
    # tiny config, fp32: 2 csa layers x (256 B entry + 128 B key) / 4 + 1 hca layer x 256 B / 8
    assert info["bytes_per_token"] == 2 * (256 + 128) / 4 + 256 / 8
    assert info["bytes_per_max_sequence"] > 256 * info["bytes_per_token"]


def test_offline_stop_string_cuts_text_and_frees(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint())
    prompt = prompts_of([8])
    full = llm.generate(prompt_token_ids=prompt,
                        sampling_params=SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0]
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip()
    cut = llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(
        max_tokens=20, stop=[stop], logprobs=1, **GREEDY))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert full.text.startswith(cut.text) and stop not in cut.text
    assert len(cut.logprobs) == len(cut.token_ids) < 20
    assert llm.engine.block_manager.all_free()


def test_chat_renders_the_official_prompt(tiny_checkpoint):
    from dsv4.encoding import encode_messages

    llm = make_llm(tiny_checkpoint(tiny_config(vocab_size=129280)), max_model_len=256,
                   max_num_batched_tokens=128)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    params = SamplingParams(max_tokens=3, **GREEDY)
    outs = llm.chat([conv, conv[1:]], params, chat_template_kwargs={"thinking": False})
    assert [o.prompt for o in outs] == [encode_messages(conv, "chat"),
                                        encode_messages(conv[1:], "chat")]
    plain = llm.generate(outs[0].prompt, params)[0]
    # the same greedy tokens as the rendered prompt alone (batched with another, FP8 rounding
    # flips could move a near-tie)
    assert llm.chat(conv, params, chat_template_kwargs={"thinking": False})[0] \
        .outputs[0].token_ids == plain.outputs[0].token_ids
    as_dict = llm.generate({"prompt": outs[0].prompt}, params)[0]  # vLLM's TextPrompt
    assert as_dict.prompt == outs[0].prompt and as_dict.outputs[0].token_ids == \
        plain.outputs[0].token_ids
    assert len(outs[1].outputs[0].token_ids) == 3
    # no thinking field: thinking is on, as DeepSeek's API
    assert llm.chat(conv, params)[0].prompt == encode_messages(conv, "thinking")
    for bad in ([], ["hello"], [{"role": "user", "content": 5}]):
        with pytest.raises(ValueError, match="messages"):
            llm.chat(bad)
    with pytest.raises(ValueError, match="role 'robot'"):
        llm.chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="thinking"):
        llm.chat(conv, params, chat_template_kwargs={"thinking": "sometimes"})
    assert llm.engine.block_manager.all_free()
