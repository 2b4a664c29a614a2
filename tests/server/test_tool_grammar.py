"""The DSML tool-call grammar, checked token by token with the real vocabulary (no model): what
it accepts is what the encoder renders for valid calls; it refuses undeclared names and
parameters, arguments that break the schema, and missing required parameters."""

from __future__ import annotations

import pytest

from dsv4.encoding import DSML, encode_messages
from dsv4.server.grammar import tool_call_grammar
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams
from dsv4.tokenizer import Tokenizer

D = DSML
TOOLS = {
    "get_weather": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "where": {"type": "object", "required": ["lat"],
                  "properties": {"lat": {"type": "number"}}}}},
    "get_time": {"type": "object", "properties": {}},
}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained("/nonexistent")


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


def rendered(calls):
    """The DSML block the official encoder writes for these (name, arguments) calls."""
    prompt = encode_messages([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}],
        thinking_mode="chat")
    block = prompt[prompt.index(f"\n\n<{D}tool_calls>"):]
    return block.removesuffix("<｜end▁of▁sentence｜>")


def accepts(compiler, tokenizer, grammar, text):
    matcher = compiler.matcher(StructuredOutputsParams(grammar=grammar))
    ids = tokenizer.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


GOOD = [
    [("get_weather", '{"city": "Paris"}')],
    [("get_weather", '{"city": "a <b> c", "unit": "f", "days": 3, "where": {"lat": 1.5}}')],
    [("get_time", "{}")],
    [("get_time", "{}"), ("get_weather", '{"city": "Rome", "days": 7}')],
]
BAD = [
    [("get_wether", '{"city": "Paris"}')],  # undeclared name
    [("get_weather", '{"city": "Paris", "country": "FR"}')],  # undeclared parameter
    [("get_weather", '{"days": 3}')],  # required city missing
    [("get_weather", '{"city": "Paris", "days": 9}')],  # over the maximum
    [("get_weather", '{"city": "Paris", "unit": "k"}')],  # not in the enum
    [("get_weather", '{"city": "Paris", "where": {"lon": 2}}')],  # nested required missing
]


@pytest.mark.parametrize("force", [True, False])
def test_valid_calls_are_accepted_and_invalid_ones_refused(compiler, tokenizer, force):
    grammar = tool_call_grammar(TOOLS, None, force=force)
    for calls in GOOD:
        assert accepts(compiler, tokenizer, grammar, rendered(calls)), calls
    for calls in BAD:
        assert not accepts(compiler, tokenizer, grammar, rendered(calls)), calls


def test_auto_allows_text_and_text_then_calls_but_no_stray_dsml(compiler, tokenizer):
    grammar = tool_call_grammar(TOOLS, None, force=False)
    block = rendered(GOOD[0])
    assert accepts(compiler, tokenizer, grammar, "Just an answer.")
    assert accepts(compiler, tokenizer, grammar, "Let me look." + block)
    assert not accepts(compiler, tokenizer, grammar, f"text <{D}invoke name=\"get_time\">")
    forced = tool_call_grammar(TOOLS, None, force=True)
    assert not accepts(compiler, tokenizer, forced, "Just an answer.")


def test_a_named_choice_allows_one_call_to_that_function(compiler, tokenizer):
    grammar = tool_call_grammar(TOOLS, "get_time", force=True)
    assert accepts(compiler, tokenizer, grammar, rendered([("get_time", "{}")]))
    assert not accepts(compiler, tokenizer, grammar, rendered([("get_weather",
                                                                '{"city": "Paris"}')]))
    assert not accepts(compiler, tokenizer, grammar, rendered([("get_time", "{}")] * 2))
