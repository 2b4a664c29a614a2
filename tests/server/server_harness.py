"""Test harness: the real server on loopback over a real engine whose sampler can replay a script.

The checkpoint is the demo architecture with the real 129,280-token tokenizer and random weights.
``ScriptedRunner`` wraps the model runner: for a request whose decoded prompt the test's
``script(prompt) -> str | None`` answers, the sampled tokens are replaced by the tokenized
answer (then EOS), so DSML really flows through the detokenizer and the output parser while the
scheduler, cache and abort paths stay real. Batches of scripted rows only skip the forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from dsv4.async_llm import AsyncLLM
from dsv4.demo import DEMO_CONFIG
from dsv4.encoding import ASSISTANT, THINK_OPEN
from dsv4.engine.llm_engine import LLMEngine
from dsv4.engine.model_runner import StepResult
from dsv4.engine_args import EngineArgs
from dsv4.model.writer import write_checkpoint
from dsv4.server.app import build_app
from dsv4.tokenizer import Tokenizer

MODEL = "dsv4-test"
ENGINE_ARGS = dict(device="cpu", max_model_len=2048, kv_cache_memory=96 << 20, max_num_seqs=8)
_CHECKPOINT: Path | None = None


def checkpoint(tmp_root: Path) -> Path:
    """One random-weight checkpoint per test session (demo architecture, real tokenizer)."""
    global _CHECKPOINT
    if _CHECKPOINT is None or not (_CHECKPOINT / "config.json").is_file():
        _CHECKPOINT = write_checkpoint(tmp_root / "dsv4-test-ckpt", DEMO_CONFIG, seed=0)
    return _CHECKPOINT


class ScriptedRunner:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer) -> None:
        self.real = engine.runner.execute
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id
        self.script: Callable[[str], str | None] | None = None
        self.prompts: list[str] = []  # every new request's decoded prompt, in arrival order
        self._plans: dict[str, list[int] | None] = {}
        engine.runner.execute = self.execute  # type: ignore[method-assign]

    def _plan(self, request_id: str, prompt_ids: list[int]) -> list[int] | None:
        if request_id not in self._plans:
            prompt = self.tokenizer.decode(prompt_ids)
            self.prompts.append(prompt)
            text = self.script(prompt) if self.script is not None else None
            self._plans[request_id] = None if text is None else self.tokenizer.encode(text)
        return self._plans[request_id]

    def execute(self, batch: Any) -> StepResult:
        rows = batch.sample_indices
        plans = {r: self._plan(batch.req_ids[r], batch.prompt_token_ids[r]) for r in rows}
        scripted_only = rows and all(plans[r] is not None for r in rows)
        if scripted_only and all(batch.sampling_params[r].logprobs is None
                                 and batch.sampling_params[r].prompt_logprobs is None
                                 for r in rows):
            result: list[list[int]] = [[] for _ in range(batch.num_reqs)]
            out, prompt_lps, drafts = None, {}, []
        else:
            result, out, prompt_lps, drafts = self.real(batch)
        for r in rows:
            ids = plans[r]
            if ids is not None:
                k = batch.num_output_tokens[r]
                result[r] = [ids[k] if k < len(ids) else self.eos]
        return StepResult(result, out, prompt_lps, drafts)


def start_uvicorn(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Serve ``app`` on a free loopback port in a thread; (server, thread, base URL)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


class ServerHandle:
    """``app_args``: more build_app keywords (logging switches, default thinking ...)."""

    def __init__(self, root: Path, api_key: str | None = None,
                 app_args: dict[str, Any] | None = None, **engine_args: Any) -> None:
        path = checkpoint(root)
        self.tokenizer = Tokenizer.from_pretrained(path)
        engine = EngineArgs(model=str(path), **{**ENGINE_ARGS, **engine_args}).create_engine(
            eos_token_id=self.tokenizer.eos_token_id)
        self.runner = ScriptedRunner(engine, self.tokenizer)
        self.llm = AsyncLLM(engine)
        self.api_key = api_key
        self.app = build_app(self.llm, self.tokenizer, MODEL, api_key=api_key,
                             **(app_args or {}))
        self.server, self.thread, self.url = start_uvicorn(self.app)

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def engine_call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return self.llm.run(fn).result(timeout=30)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request runs or waits and every cache block is free."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine_call(lambda e: not e.has_unfinished_requests()
                                and e.block_manager.all_free()):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.llm.shutdown()


def thinks(prompt: str) -> bool:
    """Whether a rendered prompt opened a thinking block (the model reasons first)."""
    return prompt.endswith(ASSISTANT + THINK_OPEN)


def chat_prompt(srv: ServerHandle, **chat: Any) -> str:
    """The prompt /v1/chat/completions renders for ``chat`` (a one-token request)."""
    srv.client().chat.completions.create(model=MODEL, max_tokens=1, **chat)
    return srv.runner.prompts[-1]


def module_server(**handle_args: Any) -> Any:
    """A module-scoped ``srv`` fixture: one ServerHandle(**handle_args) for the test module
    (``srv = module_server()`` at module level)."""

    @pytest.fixture(scope="module")
    def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
        handle = ServerHandle(tmp_path_factory.getbasetemp(), **handle_args)
        yield handle
        handle.stop()

    return srv


@pytest.fixture
def client(srv: ServerHandle) -> openai.OpenAI:
    """The openai client of the module's server (import it to use it)."""
    return srv.client()


@pytest.fixture
def script(srv: ServerHandle) -> Any:
    """Sets the module server's script for one test; cleared after it."""
    def set_script(fn: Callable[[str], str | None] | None) -> None:
        srv.runner.script = fn

    yield set_script
    srv.runner.script = None
