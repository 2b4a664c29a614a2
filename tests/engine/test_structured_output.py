"""Structured outputs in the engine: specs, the compiler, the sampler's masks, the manager.

The engine tests run the demo architecture with the real V4 vocabulary and random weights: the
model writes gibberish, so only the grammar can make the outputs valid.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from dsv4.demo import DEMO_CONFIG
from dsv4.encoding_tokens import ASSISTANT, BOS, THINK_CLOSE, THINK_OPEN, USER
from dsv4.engine.batch import GrammarMask
from dsv4.engine.sampler import Sampler, SamplingMetadata
from dsv4.engine_args import EngineArgs
from dsv4.errors import InvalidRequestError
from dsv4.model.writer import write_checkpoint
from dsv4.sampling_params import SamplingParams
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams as SO
from dsv4.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "maxItems": 3}}}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained("/nonexistent")  # the packaged V4 tokenizer.json


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, DEMO_CONFIG.vocab_size, cache_size=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("so") / "demo", DEMO_CONFIG, seed=0)


@pytest.fixture(scope="module")
def engine(checkpoint, tokenizer):
    eng = EngineArgs(model=str(checkpoint), device="cpu", max_model_len=1024,
                     kv_cache_memory=64 << 20, max_num_seqs=8).create_engine(
                         eos_token_id=tokenizer.eos_token_id)
    eng.enable_structured_outputs(tokenizer)
    return eng


def prompt(tokenizer, thinking=False):
    return tokenizer.encode(f"{BOS}{USER}hi{ASSISTANT}{THINK_OPEN if thinking else THINK_CLOSE}")


def run(engine, requests):
    """requests: id -> (prompt ids, params); -> id -> (tokens, finish_reason)."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out = {rid: [] for rid in requests}
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finished:
                done[o.request_id] = o.finish_reason
    assert not len(engine.structured)  # every grammar state was dropped
    return {rid: (out[rid], done[rid]) for rid in requests}


def text(tokenizer, ids):
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id])


# ---- specs and compiler --------------------------------------------------------------------
@pytest.mark.parametrize("kw,param", [
    ({}, "structured_outputs"),
    ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 3]}, "structured_outputs.choice"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": [1]}, "structured_outputs.json"),
    ({"regex": ""}, "structured_outputs.regex"),
])
def test_spec_shape_is_checked(kw, param):
    with pytest.raises(InvalidRequestError) as err:
        SO(**kw)
    assert err.value.param == param


def test_sampling_params_reject_what_a_grammar_cannot_end():
    for kw, param in (({"ignore_eos": True}, "ignore_eos"), ({"min_tokens": 2}, "min_tokens")):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(structured_outputs=SO(regex="a"), **kw)
        assert err.value.param == param


@pytest.mark.parametrize("spec,param", [
    (SO(regex="[a-"), "structured_outputs.regex"),
    (SO(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
     "structured_outputs.json"),
    (SO(grammar="start: foo"), "structured_outputs.grammar"),
])
def test_uncompilable_specs_name_the_field(compiler, spec, param):
    with pytest.raises(InvalidRequestError) as err:
        compiler.check(spec)
    assert err.value.param == param
    with pytest.raises(InvalidRequestError) as err:
        compiler.check(spec, param="response_format")
    assert err.value.param == "response_format"


def test_compiled_grammars_are_cached_in_a_bounded_lru(compiler):
    for i in range(4):
        compiler.check(SO(regex=f"x{i}"))
    assert len(compiler._cache) == 2
    first = compiler._cache[("regex", "x3")]
    compiler.check(SO(regex="x3"))
    assert compiler._cache[("regex", "x3")] is first  # a hit, not a recompile
    m1, m2 = compiler.matcher(SO(regex="x3")), compiler.matcher(SO(regex="x3"))
    assert m1.consume_token(compiler.tokenizer.encode("x")[0]) and not m2.is_error()


# ---- sampler -----------------------------------------------------------------------------
def test_grammar_mask_touches_only_its_rows():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 1] = 1 << 5  # token 37 only
    meta = SamplingMetadata.build([SamplingParams(temperature=0)] * 3, "cpu",
                                  grammar=GrammarMask([1], bitmask, banned=[(2, 7)]))
    out = Sampler()(logits, meta).sampled_token_ids.tolist()
    assert out[1] == 37
    assert out[0] == int(logits[0].argmax())
    masked = logits[2].clone()
    masked[7] = float("-inf")
    assert out[2] == int(masked.argmax())
    logits[2, 7] = 1e9  # the banned token wins unless masked
    assert Sampler()(logits, meta).sampled_token_ids.tolist()[2] != 7


# ---- engine -----------------------------------------------------------------------------
def test_outputs_follow_their_grammar_and_free_rows_are_untouched(engine, tokenizer):
    p = prompt(tokenizer)
    free = {"free": (p, SamplingParams(temperature=0, max_tokens=12))}
    alone = run(engine, free)
    mixed = run(engine, {
        **free,
        "json": (p, SamplingParams(seed=1, max_tokens=200, structured_outputs=SO(json=SCHEMA))),
        "regex": (p, SamplingParams(seed=2, max_tokens=60,
                                    structured_outputs=SO(regex=r"[a-z]{3,8}@example\.org"))),
        "choice": (p, SamplingParams(seed=3, max_tokens=20,
                                     structured_outputs=SO(choice=["red", "green", "blue"]))),
        "object": (p, SamplingParams(seed=4, max_tokens=300,
                                     structured_outputs=SO(json_object=True))),
    })
    assert mixed["free"] == alone["free"]
    for rid in ("json", "regex", "choice", "object"):
        assert mixed[rid][1] == "stop", rid
    jsonschema.validate(json.loads(text(tokenizer, mixed["json"][0])), SCHEMA)
    assert re.fullmatch(r"[a-z]{3,8}@example\.org", text(tokenizer, mixed["regex"][0]))
    assert text(tokenizer, mixed["choice"][0]) in ("red", "green", "blue")
    assert isinstance(json.loads(text(tokenizer, mixed["object"][0])), dict)


def test_thinking_is_free_and_the_grammar_starts_after_think_close(engine, tokenizer):
    close = tokenizer.token_to_id(THINK_CLOSE)
    eos = tokenizer.eos_token_id
    # a strong bias on </think> ends the reasoning after a few tokens; under the grammar it is
    # masked, and EOS (biased too) is masked while reasoning
    params = SamplingParams(seed=5, max_tokens=300, logit_bias={close: 12.0, eos: 30.0},
                            structured_outputs=SO(json=SCHEMA))
    (ids, reason), = run(engine, {"t": (prompt(tokenizer, thinking=True), params)}).values()
    assert reason == "stop" and close in ids
    answer = ids[ids.index(close) + 1:]
    jsonschema.validate(json.loads(text(tokenizer, answer)), SCHEMA)


def test_a_request_cut_by_max_tokens_ends_with_length(engine, tokenizer):
    params = SamplingParams(seed=1, max_tokens=3, structured_outputs=SO(json=SCHEMA))
    (ids, reason), = run(engine, {"cut": (prompt(tokenizer), params)}).values()
    assert reason == "length" and len(ids) == 3
    assert text(tokenizer, ids).startswith("{")


def test_the_engine_rejects_an_uncompilable_spec_before_queueing(engine, tokenizer):
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", prompt(tokenizer),
                           SamplingParams(structured_outputs=SO(regex="(")))
    assert err.value.param == "structured_outputs.regex"
    assert not engine.has_unfinished_requests() and not len(engine.structured)


def test_llm_takes_vllms_structured_outputs_shape(checkpoint):
    import dsv4

    llm = dsv4.LLM(checkpoint, device="cpu", max_model_len=512, kv_cache_memory=16 << 20)
    params = dsv4.SamplingParams(seed=3, n=2, max_tokens=200,
                                 structured_outputs=dsv4.StructuredOutputsParams(json=SCHEMA))
    (out,) = llm.chat([{"role": "user", "content": "hi"}], params,
                      chat_template_kwargs={"thinking": False})
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_a_preempted_request_keeps_its_grammar_state(engine, tokenizer):
    """Preemption keeps the output and recomputes the cache: the matcher, which follows the
    output tokens, needs no rollback, and a seeded request samples the same tokens."""
    params = SamplingParams(seed=7, max_tokens=200, structured_outputs=SO(json=SCHEMA))
    (plain, _), = run(engine, {"plain": (prompt(tokenizer), params)}).values()
    engine.add_request("pre", prompt(tokenizer), params)
    out = []
    for _ in range(6):
        out += [t for o in engine.step() for t in o.new_token_ids]
    scheduler = engine.scheduler
    req = scheduler.requests["pre"]
    scheduler.running.remove(req)
    scheduler._preempt(req)
    while engine.has_unfinished_requests():
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert req.num_preemptions == 1 and out == plain
    jsonschema.validate(json.loads(text(tokenizer, out)), SCHEMA)
