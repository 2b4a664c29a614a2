"""`dsv4 serve --default-thinking on|off`: the chat mode of a request that does not name one.

Each server default is tested over real HTTP with the official openai client: a request with no
thinking field is rendered in the default mode (the recorded prompt is the official encoding of
that mode) and its answer lands where that mode puts it; every request spelling that names a
mode wins over either default. The flag itself is checked from the command line to the app.
"""

from __future__ import annotations

import anthropic
import pytest
from server_harness import MODEL, ServerHandle, checkpoint

from dsv4.encoding import ASSISTANT, THINK_OPEN, encode_messages
from dsv4.server import launch

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
THINKING_SPELLINGS = [
    dict(extra_body={"thinking": {"type": "enabled"}}),
    dict(extra_body={"chat_template_kwargs": {"thinking": True}}),
    dict(extra_body={"chat_template_kwargs": {"enable_thinking": True}}),
    dict(reasoning_effort="high"),
]
CHAT_SPELLINGS = [
    dict(extra_body={"thinking": {"type": "disabled"}}),
    dict(extra_body={"chat_template_kwargs": {"thinking": False}}),
    dict(extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
    dict(reasoning_effort="none"),
]


@pytest.fixture(scope="module", params=[True, False], ids=["default_on", "default_off"])
def srv(request, tmp_path_factory):
    handle = ServerHandle(tmp_path_factory.getbasetemp(),
                          app_args={"default_thinking": request.param})
    # the "model" thinks only when the prompt opened a thinking block
    handle.runner.script = lambda prompt: ("Two and two.</think>4"
                                           if prompt.endswith(ASSISTANT + THINK_OPEN) else "4")
    yield handle
    handle.stop()


def ask(srv: ServerHandle, **kw):
    return srv.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32,
                                                **kw)


def test_request_without_a_mode_gets_the_server_default(srv):
    default_on = srv.app.state.dsv4.default_thinking
    r = ask(srv)
    msg = r.choices[0].message
    if default_on:
        assert srv.runner.prompts[-1] == encode_messages(MESSAGES, "thinking")
        assert (msg.reasoning_content, msg.content) == ("Two and two.", "4")
    else:
        assert srv.runner.prompts[-1] == encode_messages(MESSAGES, "chat")
        assert msg.content == "4" and not getattr(msg, "reasoning_content", None)
    assert r.choices[0].finish_reason == "stop"
    # /tokenize renders a chat request the same way
    rendered = srv.http().post("/tokenize", json={"messages": MESSAGES}).json()["prompt"]
    assert rendered == encode_messages(MESSAGES, "thinking" if default_on else "chat")
    assert srv.wait_idle()


def test_messages_and_responses_get_the_server_default(srv):
    """The default reaches deepseek-recipe's conversion (ConversionOptions) and the renderer
    alike: a Messages or Responses request that names no mode is rendered in it."""
    default_on = srv.app.state.dsv4.default_thinking
    want = encode_messages(MESSAGES, "thinking" if default_on else "chat")
    claude = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    blocks = claude.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES).content
    assert srv.runner.prompts[-1] == want
    assert [b.type for b in blocks] == (["thinking", "text"] if default_on else ["text"])
    r = srv.client().responses.create(model=MODEL, input=MESSAGES[0]["content"],
                                      max_output_tokens=32)
    assert srv.runner.prompts[-1] == want and r.output_text == "4"
    # a named mode wins on both
    claude.messages.create(model=MODEL, max_tokens=32, messages=MESSAGES,
                           thinking={"type": "disabled" if default_on else "enabled",
                                     "budget_tokens": 1024})
    srv.client().responses.create(model=MODEL, input=MESSAGES, max_output_tokens=32,
                                  reasoning={"effort": "none" if default_on else "high"})
    flipped = encode_messages(MESSAGES, "chat" if default_on else "thinking")
    assert srv.runner.prompts[-2] == srv.runner.prompts[-1] == flipped


@pytest.mark.parametrize("spelling", THINKING_SPELLINGS + CHAT_SPELLINGS,
                         ids=["thinking.enabled", "kwargs.thinking=True",
                              "kwargs.enable_thinking=True", "effort=high",
                              "thinking.disabled", "kwargs.thinking=False",
                              "kwargs.enable_thinking=False", "effort=none"])
def test_a_mode_named_in_the_request_wins(srv, spelling):
    thinking = spelling in THINKING_SPELLINGS
    msg = ask(srv, **spelling).choices[0].message
    prompt = srv.runner.prompts[-1]
    if thinking:
        assert prompt.endswith(ASSISTANT + THINK_OPEN)
        assert (msg.reasoning_content, msg.content) == ("Two and two.", "4")
    else:
        assert prompt == encode_messages(MESSAGES, "chat")
        assert msg.content == "4" and not getattr(msg, "reasoning_content", None)


def test_serve_flag_reaches_the_app(tmp_path_factory, monkeypatch):
    apps = []
    monkeypatch.setattr(launch._Server, "run", lambda self, **kw: apps.append(self.config.app))
    path = checkpoint(tmp_path_factory.getbasetemp())
    base = [str(path), "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory",
            "32MiB", "--log-level", "warning"]
    assert launch.main(base) == 0
    assert launch.main([*base, "--default-thinking", "off"]) == 0
    assert [app.state.dsv4.default_thinking for app in apps] == [True, False]
    with pytest.raises(SystemExit) as exc:
        launch.build_parser().parse_args(["--default-thinking", "maybe"])
    assert exc.value.code == 2
