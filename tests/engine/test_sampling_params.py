"""SamplingParams / validate_prompt / EngineConfig validation: errors name the bad field."""

from __future__ import annotations

import pytest

from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.request import Request, RequestStatus
from dsv4.errors import InvalidRequestError
from dsv4.sampling_params import SamplingParams, validate_prompt


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.n) == (1.0, 1.0, -1, 0.0,
                                                                              16, 1)
    assert p.stop == [] and p.stop_token_ids == [] and not p.is_greedy and not p.has_penalties
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_k=0).top_k == 0  # 0 means off, like -1
    assert SamplingParams(repetition_penalty=1.1).has_penalties


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1), ("n", 0), ("n", True),
    ("max_tokens", 0), ("max_tokens", 1.5), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("seed", "7"), ("logprobs", -1),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("min_tokens", -1),
    ("min_tokens", 1.5), ("min_tokens", 17), ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: float("inf")}), ("prompt_logprobs", -1),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.mark.parametrize("ids,params,param,match", [
    ([], SamplingParams(max_tokens=50), "prompt", "empty"),
    ([1, 10], SamplingParams(max_tokens=50), "prompt", "vocabulary"),
    ([-1], SamplingParams(max_tokens=50), "prompt", "vocabulary"),
    ([1] * 51, SamplingParams(max_tokens=50), "max_tokens", "context length is 100"),
    ([1] * 100, SamplingParams(max_tokens=None), "prompt", "context length is 100"),
    ([1], SamplingParams(stop_token_ids=[10]), "stop_token_ids", "vocabulary"),
    ([1], SamplingParams(logprobs=11), "logprobs", "vocabulary size"),
    ([1], SamplingParams(logit_bias={10: 1.0}), "logit_bias", "vocabulary"),
    ([1], SamplingParams(prompt_logprobs=11), "prompt_logprobs", "vocabulary size"),
])
def test_validate_prompt_names_the_parameter(ids, params, param, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        validate_prompt(ids, params, max_model_len=100, vocab_size=10)
    assert info.value.param == param


def test_validate_prompt_accepts_what_fits():
    validate_prompt([1, 2, 3], SamplingParams(max_tokens=50), max_model_len=100, vocab_size=10)
    validate_prompt([1] * 99, SamplingParams(max_tokens=None), max_model_len=100, vocab_size=10)


@pytest.mark.parametrize("field, value", [
    ("max_model_len", 0), ("max_model_len", 1_048_577), ("max_num_seqs", 0),
    ("max_num_batched_tokens", -1), ("block_size", 0), ("kv_cache_memory", 0),
    ("kv_cache_dtype", "int8"), ("index_cache_dtype", "fp16"), ("compressor_state_dtype", "fp8"),
])
def test_engine_config_errors(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_engine_config_defaults():
    ec = EngineConfig()
    assert ec.max_model_len == 1_048_576 and ec.block_size == 256
    assert ec.replace(max_num_seqs=4).max_num_seqs == 4
    with pytest.raises(AttributeError):
        ec.max_num_seqs = 3  # frozen


def test_request_bookkeeping():
    req = Request("r", [5, 6, 7], SamplingParams(max_tokens=2), eos_token_id=1)
    assert req.status == RequestStatus.WAITING and req.num_tokens == 3
    assert req.check_stop(max_model_len=100) is None
    req.append_output_token_ids(9)
    req.append_output_token_ids([1])
    assert req.all_token_ids == [5, 6, 7, 9, 1] and req.num_output_tokens == 2
    assert req.check_stop(max_model_len=100) == RequestStatus.FINISHED_STOPPED
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.RUNNING.finish_reason is None and not RequestStatus.PREEMPTED.is_finished
