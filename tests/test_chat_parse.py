"""README's offline chat snippet: `LLM.chat`, then `parse_message_from_completion_text` on its text.

`LLM.chat` text never holds EOS (EOS ends generation and is a special token), so the parse call
the README shows passes ``require_eos=False``; the strict default still demands EOS, as DeepSeek's
reference parser does. One test samples the random model with the tags that could make parsing
fail banned (the answer is whatever it says); the other scripts the sampled tokens so a normal
EOS stop carries reasoning, content and a tool call through the real detokenizer.
"""

from __future__ import annotations

import pytest
from conftest import tiny_config

from dsv4.encoding import DSML, EOS, THINK_CLOSE, THINK_OPEN
from dsv4.encoding_parse import parse_message_from_completion_text
from dsv4.llm import LLM
from dsv4.sampling_params import SamplingParams

CALL = (f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
        f'</{DSML}invoke>\n</{DSML}tool_calls>')


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from dsv4.model import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("chat_parse") / "ck",
                            tiny_config(vocab_size=129280), tokenizer=False)
    return LLM(path, device="cpu", kv_cache_memory=32 << 20, max_model_len=256,
               max_num_batched_tokens=128)


def script(llm: LLM, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Make every sampling row emit the tokens of `text`, then EOS (the forward still runs)."""
    ids = llm.tokenizer.encode(text) + [llm.tokenizer.eos_token_id]
    real = llm.engine.runner.execute

    def execute(batch):
        step = real(batch)
        for r in batch.sample_indices:
            k = batch.num_output_tokens[r]
            step.sampled[r] = [ids[min(k, len(ids) - 1)]]
        return step

    monkeypatch.setattr(llm.engine.runner, "execute", execute)


def test_readme_snippet_parses_sampled_chat_output(llm):
    # the tags that would make a chat-mode completion fail to parse cannot be sampled
    banned = {llm.tokenizer.encode(tag)[0]: -100.0 for tag in (THINK_OPEN, THINK_CLOSE, DSML)}
    params = SamplingParams(max_tokens=6, temperature=0.0, logit_bias=banned)
    chat = llm.chat([{"role": "user", "content": "Hi"}], params,
                    chat_template_kwargs={"thinking": False})
    text = chat[0].outputs[0].text
    assert EOS not in text
    msg = parse_message_from_completion_text(text, "chat", require_eos=False)
    assert msg == {"role": "assistant", "content": text, "reasoning_content": "",
                   "tool_calls": []}


def test_normal_stop_parses_without_eos(llm, monkeypatch):
    script(llm, monkeypatch, f"Let me check.{THINK_CLOSE}Sure.{CALL}")
    chat = llm.chat([{"role": "user", "content": "Weather in Paris?"}],
                    SamplingParams(max_tokens=200))
    out = chat[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.tokenizer.eos_token_id
    assert out.text == f"Let me check.{THINK_CLOSE}Sure.{CALL}"  # EOS is not in the text
    msg = parse_message_from_completion_text(out.text, "thinking", require_eos=False)
    assert (msg["reasoning_content"], msg["content"]) == ("Let me check.", "Sure.")
    assert msg["tool_calls"] == [{"type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    # plain content: the strict default still wants the EOS the reference parser demands
    script(llm, monkeypatch, f"Hmm.{THINK_CLOSE}It is sunny.")
    text = llm.chat([{"role": "user", "content": "And now?"}],
                    SamplingParams(max_tokens=200))[0].outputs[0].text
    assert parse_message_from_completion_text(text, "thinking", require_eos=False)["content"] \
        == "It is sunny."
    with pytest.raises(ValueError, match="require_eos=False"):
        parse_message_from_completion_text(text, "thinking")
    assert parse_message_from_completion_text(text + EOS, "thinking")["content"] == "It is sunny."


def test_require_eos_false_keeps_the_other_checks():
    assert parse_message_from_completion_text("", "chat", require_eos=False)["content"] == ""
    for text, mode in ((f"a{EOS}b", "chat"), (f"a{THINK_CLOSE}b", "chat"),
                       ("no close tag", "thinking"), (f"{CALL}tail", "chat")):
        with pytest.raises(ValueError):
            parse_message_from_completion_text(text, mode, require_eos=False)
