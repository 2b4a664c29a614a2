"""Speculative decoding under a grammar: each verified position gets its own mask.

A row under a grammar verifies its drafts like any other: position j is masked as the grammar
stands after the drafts before it, so accepted tokens always follow the grammar, and a seeded
or greedy request gives the tokens it gives without speculation (fp64, the exact mode). The
demo architecture with the real V4 vocabulary and random weights: only the grammar makes the
outputs valid.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from test_structured_output import SCHEMA, prompt, run, text

from dsv4.demo import DEMO_CONFIG
from dsv4.encoding_tokens import THINK_CLOSE
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.structured_output import StructuredOutputManager
from dsv4.engine_args import EngineArgs
from dsv4.model.writer import write_checkpoint
from dsv4.sampling_params import SamplingParams
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams as SO
from dsv4.tokenizer import Tokenizer

REGEX = r"[a-z]{3,8}@example\.org"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained("/nonexistent")  # the packaged V4 tokenizer.json


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("specgrammar") / "demo", DEMO_CONFIG, seed=0)


def engine(checkpoint, tokenizer, k: int = 0):
    spec = {"method": "mtp", "num_speculative_tokens": k} if k else None
    eng = EngineArgs(model=str(checkpoint), device="cpu", dtype="float64", max_model_len=1024,
                     kv_cache_memory=64 << 20, max_num_seqs=8,
                     speculative_config=spec).create_engine(eos_token_id=tokenizer.eos_token_id)
    eng.enable_structured_outputs(tokenizer)
    return eng


class RequestDrafts:
    """A draft_override hook by request id: the reference continuation ("right"), tokens that
    are never it ("wrong"), or one right then wrong ones ("partial")."""

    def __init__(self, prompts: dict[str, list[int]], reference: dict[str, list[int]],
                 mode: str) -> None:
        self.prompts, self.ref, self.mode = prompts, reference, mode

    def __call__(self, request_id, so_far, proposed):
        done = len(so_far) - len(self.prompts[request_id])
        right = (self.ref[request_id][done:done + len(proposed)] + [0] * len(proposed))
        right = right[:len(proposed)]
        wrong = [(t + 1) % 512 for t in right]
        return {"right": right, "wrong": wrong, "partial": right[:1] + wrong[1:]}[self.mode]


def requests(tokenizer) -> dict[str, tuple[list[int], SamplingParams]]:
    close, eos = tokenizer.token_to_id(THINK_CLOSE), tokenizer.eos_token_id
    p = prompt(tokenizer)
    return {
        "json": (p, SamplingParams(seed=1, max_tokens=120, structured_outputs=SO(json=SCHEMA))),
        "regex": (p, SamplingParams(temperature=0, max_tokens=40,
                                    structured_outputs=SO(regex=REGEX))),
        # the reasoning ends after a few tokens (a bias on </think>); the grammar starts there
        "think": (prompt(tokenizer, thinking=True),
                  SamplingParams(seed=5, max_tokens=120, logit_bias={close: 12.0, eos: 30.0},
                                 structured_outputs=SO(json=SCHEMA))),
        "free": (p, SamplingParams(temperature=0, max_tokens=24)),
    }


@pytest.fixture(scope="module")
def reference(checkpoint, tokenizer):
    eng = engine(checkpoint, tokenizer)
    steps = 0
    real = eng.step

    def step():
        nonlocal steps
        steps += 1
        return real()

    eng.step = step
    return run(eng, requests(tokenizer)), steps


@pytest.mark.parametrize("mode", ["mtp", "right", "wrong", "partial"])
def test_grammar_rows_speculate_and_give_the_same_tokens(checkpoint, tokenizer, reference,
                                                         mode):
    want, plain_steps = reference
    reqs = requests(tokenizer)
    eng = engine(checkpoint, tokenizer, k=3)
    if mode != "mtp":
        eng.runner.draft_override = RequestDrafts(
            {rid: ids for rid, (ids, _) in reqs.items()},
            {rid: out for rid, (out, _) in want.items()}, mode)
    steps, real = 0, eng.step
    verified = []  # (request id, drafts) of the grammar rows' verify steps

    def step():
        nonlocal steps
        steps += 1
        sched = eng.scheduler
        for req in sched.running:
            if req.sampling_params.structured_outputs is not None and req.spec_token_ids:
                verified.append(req.request_id)
        return real()

    eng.step = step
    got = run(eng, reqs)
    assert got == want
    assert {"json", "regex", "think"} <= set(verified)  # grammar rows did carry drafts
    if mode == "right":  # every draft accepted: far fewer steps
        assert steps < plain_steps * 0.6
    jsonschema.validate(json.loads(text(tokenizer, got["json"][0])), SCHEMA)
    assert re.fullmatch(REGEX, text(tokenizer, got["regex"][0]))
    ids = got["think"][0]
    close = tokenizer.token_to_id(THINK_CLOSE)
    jsonschema.validate(json.loads(text(tokenizer, ids[ids.index(close) + 1:])), SCHEMA)


def _masks(mgr: StructuredOutputManager, tokens: list[list[int]], outputs: list[list[int]],
           drafts: list[int]) -> tuple[list[int], torch.Tensor, list]:
    batch = ScheduledBatch(req_ids=[str(i) for i in range(len(tokens))], token_ids=tokens,
                           num_computed_tokens=[10] * len(tokens),
                           do_sample=[True] * len(tokens), num_draft_tokens=drafts,
                           output_token_ids=outputs)
    mask = mgr.prepare(batch)
    return mask.rows, mask.bitmask, mask.banned


def _allowed(row: torch.Tensor, vocab: int) -> set[int]:
    bits = (row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:vocab].nonzero().flatten().tolist())


def test_masks_per_verified_position(tokenizer):
    """Position j is masked as the grammar stands after drafts 1..j; positions past a draft
    the grammar refuses copy the last reachable mask; a </think> among a reasoning row's drafts
    starts the grammar at the next position, EOS banned before it."""
    vocab = DEMO_CONFIG.vocab_size
    mgr = StructuredOutputManager(vocab)
    mgr.enable(GrammarCompiler(tokenizer, vocab))
    choice = SO(choice=["hello world", "help me"])
    hello, world = tokenizer.encode("hello world")
    close, eos = tokenizer.token_to_id(THINK_CLOSE), tokenizer.eos_token_id
    think_open = tokenizer.token_to_id("<think>")
    mgr.add_request("0", SamplingParams(structured_outputs=choice), [1, 2])
    mgr.add_request("1", SamplingParams(structured_outputs=choice), [1, 2])
    mgr.add_request("2", SamplingParams(structured_outputs=choice), [1, think_open])
    tokens = [[7, hello, world, 12345],  # the third draft is refused
              [7],  # no drafts
              [7, 5, close, hello]]  # reasoning until the second draft, </think>
    rows, bitmask, banned = _masks(mgr, tokens, [[], [], [5, 6]], [3, 0, 3])
    # positions: row 0 -> 0..3, row 1 -> 4, row 2 -> 5..8 (5, 6 free; grammar from 7)
    assert rows == [0, 1, 2, 3, 4, 7, 8]
    allowed = [_allowed(r, vocab) for r in bitmask]
    assert hello in allowed[0] and world not in allowed[0]
    assert allowed[1] == {world}  # after "hello"
    assert allowed[2] == {eos}  # after "hello world": complete
    assert allowed[3] == allowed[2]  # past the refused draft: a copy, never reached
    assert allowed[4] == allowed[0]  # row 1: the grammar's start
    assert allowed[5] == allowed[0]  # row 2: the grammar starts after </think>
    assert allowed[6] == {world}
    assert banned == [(5, eos), (6, eos)]
    # the tentative drafts left every matcher where it was
    rows, bitmask, _ = _masks(mgr, [[7], [7], [7]], [[], [], [5, 6]], [0, 0, 0])
    assert [_allowed(r, vocab) for r in bitmask] == [allowed[0]] * 2
    assert rows == [0, 1]  # row 2 is still reasoning
