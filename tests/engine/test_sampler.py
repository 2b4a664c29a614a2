"""Sampler: greedy, masks, penalties, seeded reproducibility across batches, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.sampler import Sampler, SamplingMetadata
from dsv4.sampling_params import SamplingParams

V = 64
sampler = Sampler()


def meta(params, **kw) -> SamplingMetadata:
    return SamplingMetadata.build(params, "cpu", vocab_size=V, **kw)


def finite(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_greedy_equals_argmax():
    logits = torch.randn(5, V)
    m = meta([SamplingParams(temperature=0.0)] * 5)
    assert m.all_greedy
    out = sampler(logits, m)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1)) and out.logprobs is None
    # mixed batch: greedy rows still take the argmax
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)] * 2
    out = sampler(logits[:4], meta(mixed))
    assert out.sampled_token_ids[0] == logits[0].argmax()
    assert out.sampled_token_ids[2] == logits[2].argmax()
    # bf16 logits are fine
    assert sampler(logits.bfloat16(), m).sampled_token_ids.dtype == torch.int64


def test_top_k_top_p_min_p_masks():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.79),  # 0.5 + 0.3 reaches 0.79: keep 2
        SamplingParams(top_p=0.81),  # needs the third
        SamplingParams(min_p=0.2),  # drop probs < 0.1
        SamplingParams(top_k=3, top_p=0.7, min_p=0.35),  # min-p drops 0.15 / 0.05, then
        # top-p on the renormalised rest (0.625, 0.375) keeps both
        SamplingParams(top_p=0.6, min_p=0.35),  # 0.625 alone reaches 0.6
    ]
    m = SamplingMetadata.build(params, "cpu", vocab_size=4)
    masked = Sampler.apply_top_k_top_p_min_p(logits.expand(6, 4), m)
    assert [finite(row) for row in masked] == [{0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1}, {0}]
    kept = masked[0][torch.isfinite(masked[0])]
    assert torch.allclose(kept, logits[0, :2])  # kept logits are untouched


def test_top_k_is_respected_when_sampling():
    logits = torch.randn(1, V)
    top5 = set(logits[0].topk(5).indices.tolist())
    for seed in range(50):
        m = meta([SamplingParams(top_k=5, temperature=2.0, seed=seed)])
        assert sampler(logits, m).sampled_token_ids.item() in top5


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    out_ids, prompt_ids = [[0, 0, 3]], [[1]]
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25,
                       repetition_penalty=2.0)
    m = SamplingMetadata.build([p], "cpu", output_token_ids=out_ids, prompt_token_ids=prompt_ids)
    got = Sampler.apply_penalties(logits, m)
    # token 0: 2/2 - 0.25*2 - 0.5; token 1 (prompt): -2*2; token 3: 0.5/2 - 0.25 - 0.5
    expected = torch.tensor([[0.0, -4.0, 1.0, -0.5, 0.0]])
    assert torch.allclose(got, expected)
    assert sampler(logits, m).sampled_token_ids.item() == 2  # greedy over penalised logits
    with pytest.raises(ValueError, match="output_token_ids"):
        SamplingMetadata.build([p], "cpu")


def test_penalties_only_touch_their_rows():
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0.0), SamplingParams(frequency_penalty=1.0)]
    m = SamplingMetadata.build(params, "cpu", output_token_ids=[[1, 2], [1, 2]],
                               prompt_token_ids=[[3], [3]])
    got = Sampler.apply_penalties(logits, m)
    assert torch.equal(got[0], logits[0])
    assert torch.allclose(got[1, [1, 2]], logits[1, [1, 2]] - 1.0)


def run_seeded(logits: torch.Tensor, params: list[SamplingParams], row: int, steps: int):
    tokens = []
    for index in range(steps):
        m = meta(params, output_index=[index] * len(params))
        tokens.append(sampler(logits, m).sampled_token_ids[row].item())
    return tokens


def test_seeded_request_same_alone_and_in_a_batch():
    torch.manual_seed(0)
    target_logits = torch.randn(1, V)
    target = SamplingParams(temperature=1.3, top_p=0.9, top_k=20, seed=1234)
    alone = run_seeded(target_logits, [target], 0, 12)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=1.0, seed=7, min_p=0.1)]
    batch_logits = torch.cat([torch.randn(2, V), target_logits, torch.randn(1, V)])
    params = [others[0], others[1], target, others[2]]
    torch.manual_seed(99)  # the global RNG (unseeded rows) must not matter
    in_batch = run_seeded(batch_logits, params, 2, 12)
    assert alone == in_batch
    assert len(set(alone)) > 1  # it really samples
    other_seed = run_seeded(target_logits, [SamplingParams(temperature=1.3, top_p=0.9,
                                                           top_k=20, seed=4321)], 0, 12)
    assert other_seed != alone


def test_seeded_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    params = [SamplingParams(seed=s) for s in range(2000)]
    out = sampler(logits, SamplingMetadata.build(params, "cpu", vocab_size=4))
    freq = torch.bincount(out.sampled_token_ids, minlength=4).float() / 2000
    assert torch.allclose(freq, probs, atol=0.04)
    # temperature sharpens
    cold = [SamplingParams(seed=s, temperature=0.25) for s in range(2000)]
    out = sampler(logits, SamplingMetadata.build(cold, "cpu", vocab_size=4))
    assert (out.sampled_token_ids == 0).float().mean() > 0.85


def test_logprobs_shape_and_values():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.7, seed=5, logprobs=1, presence_penalty=1.0),
              SamplingParams(temperature=0.0)]
    m = SamplingMetadata.build(params, "cpu", output_token_ids=[[0], [1], []],
                               prompt_token_ids=[[], [], []])
    assert m.max_num_logprobs == 3
    out = sampler(logits, m)
    lp = out.logprobs
    assert lp.token_ids.shape == lp.logprobs.shape == (3, 4)
    raw = torch.log_softmax(logits, dim=-1)  # from the raw distribution, before penalties
    assert torch.equal(lp.token_ids[:, 0], out.sampled_token_ids)
    assert torch.allclose(lp.logprobs[:, 0], raw.gather(1, out.sampled_token_ids[:, None])[:, 0])
    top = raw.topk(3, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top.indices)
    assert torch.allclose(lp.logprobs[:, 1:], top.values)
    expected_ranks = [(raw[i] > raw[i, t]).sum().item() + 1
                      for i, t in enumerate(out.sampled_token_ids.tolist())]
    assert lp.sampled_token_ranks.tolist() == expected_ranks
    assert lp.sampled_token_ranks[0] == 1  # greedy row sampled the argmax
    assert math.isclose(lp.logprobs[0].exp()[1:].sum().item(),
                        torch.softmax(logits[0], -1).topk(3).values.sum().item(), rel_tol=1e-5)
    only_sampled = sampler(logits, meta([SamplingParams(logprobs=0)] * 3))
    assert only_sampled.logprobs.token_ids.shape == (3, 1)


def test_from_batch_picks_sampling_rows():
    batch = ScheduledBatch(
        req_ids=["a", "b", "c"], token_ids=[[1, 2], [3], [4]], num_computed_tokens=[0, 5, 9],
        do_sample=[False, True, True],
        sampling_params=[SamplingParams(), SamplingParams(temperature=0.0),
                         SamplingParams(seed=3, repetition_penalty=1.2)],
        num_output_tokens=[0, 4, 2], prompt_token_ids=[[1, 2], [7], [8]],
        output_token_ids=[[], [1, 1, 1, 1], [5, 6]],
    )
    m = SamplingMetadata.from_batch(batch, "cpu", vocab_size=V)
    assert m.seeds == [None, 3] and m.output_index == [4, 2]
    assert m.output_token_ids == [[1, 1, 1, 1], [5, 6]] and m.prompt_token_ids == [[7], [8]]
    assert m.is_greedy.tolist() == [True, False] and not m.all_greedy
    assert sampler(torch.randn(2, V), m).sampled_token_ids.shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_on_cuda():
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05, seed=11),
              SamplingParams(temperature=1.0, frequency_penalty=0.5),
              SamplingParams(temperature=1.2, seed=11)]
    kw = dict(output_token_ids=[[1], [2], [3, 3], []], prompt_token_ids=[[], [], [], []],
              vocab_size=V)
    out = sampler(logits.cuda(), SamplingMetadata.build(params, "cuda", **kw))
    assert out.sampled_token_ids.device.type == "cuda"
    assert out.sampled_token_ids[0].item() == logits[0].argmax().item()
    alone = sampler(logits[1:2].cuda(), SamplingMetadata.build(
        params[1:2], "cuda", output_token_ids=[[2]], vocab_size=V))
    assert alone.sampled_token_ids[0].item() == out.sampled_token_ids[1].item()
    masked = Sampler.apply_top_k_top_p_min_p(logits.cuda(), SamplingMetadata.build(
        params, "cuda", vocab_size=V))
    cpu = Sampler.apply_top_k_top_p_min_p(logits, SamplingMetadata.build(params, "cpu",
                                                                         vocab_size=V))
    assert torch.equal(torch.isfinite(masked).cpu(), torch.isfinite(cpu))


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(3, V)
    logits[:, 5] = 1.0  # token 5 wins unbiased
    params = [SamplingParams(temperature=0.0, logit_bias={7: 2.0, 5: -0.5}, logprobs=0),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5]),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])]
    m = meta(params, output_index=[0, 1, 2], eos_token_ids=[None, 9, 9])
    out = sampler(logits, m)
    # row 0 biased to 7; row 1 (1 output so far, below min_tokens) cannot take 5; row 2 can
    assert out.sampled_token_ids[0] == 7 and out.sampled_token_ids[2] == 5
    assert out.sampled_token_ids[1] not in (5, 9)
    masked = sampler.apply_bias_and_min_tokens(logits, m)
    assert masked[1, 5] == masked[1, 9] == float("-inf") and torch.isfinite(masked[2]).all()
    assert masked[0, 7] == 2.0 and masked[0, 5] == 0.5
    # logprobs stay those of the raw logits (vLLM's default)
    assert math.isclose(out.logprobs.logprobs[0, 0].item(),
                        torch.log_softmax(logits[0], -1)[7].item(), rel_tol=1e-6)
    # ignore_eos: EOS is an ordinary token, only the stop ids are masked
    m2 = meta([SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)],
              output_index=[0], eos_token_ids=[5])
    assert sampler(logits[:1], m2).sampled_token_ids[0] == 5
