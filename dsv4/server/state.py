"""ServerState: what every endpoint shares (engine, input processor, names, metrics) + helpers.

Holds the request-to-SamplingParams mapping (validation is the shared
``dsv4.input_processor.InputProcessor``'s), token strings for logprobs, SSE framing, and
``until_disconnect`` (a non-streaming request whose client goes away is cancelled, which aborts
its engine requests). Never touches the engine's internals: it sees ``AsyncLLM`` only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from starlette.requests import Request

from dsv4.async_llm import AsyncLLM
from dsv4.input_processor import InputProcessor
from dsv4.sampling_params import SamplingParams
from dsv4.server.metrics import ServerMetrics
from dsv4.server.protocol import APIError
from dsv4.structured_outputs import GrammarCompiler, StructuredOutputsParams
from dsv4.tokenizer import Tokenizer

__all__ = ["SSE_DONE", "ClientGone", "ServerState", "sse", "until_disconnect"]

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


@dataclass
class ServerState:
    llm: AsyncLLM
    tokenizer: Tokenizer
    model_names: list[str]
    effort_profile: str = "preview"
    api_key: str | None = None
    model_root: str | None = None
    default_thinking: bool = True  # the chat mode of a request that names none
    metrics: ServerMetrics = field(init=False)
    processor: InputProcessor = field(init=False)
    grammar: GrammarCompiler = field(init=False)  # shared with the engine
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.model_names[0])
        self.processor = InputProcessor(self.tokenizer, self.llm.max_model_len,
                                        self.llm.vocab_size, self.effort_profile)
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)
        self.grammar = self.llm.enable_structured_outputs(self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size

    def check_model(self, name: str | None) -> str:
        """The served name to report; 404 (OpenAI's shape) for a model not served here."""
        if name is None or name == "":
            return self.model_names[0]
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist. Served: "
                           f"{', '.join(self.model_names)}", param="model",
                           code="model_not_found")
        return name

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def sampling_params(self, req: Any, prompts: list[list[int]], *, max_tokens: int | None,
                        logprobs: int | None, skip_special_tokens: bool,
                        prompt_field: str,
                        structured_outputs: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        """SamplingParams for a request's fields, checked against every prompt; raises
        InvalidRequestError naming the field (context length included). Without max_tokens a
        request may run to the end of the context (vLLM's chat default)."""
        if max_tokens is None:
            max_tokens = max(1, self.max_model_len - max(len(p) for p in prompts))
        bias = {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None
        params = SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None
            else req.repetition_penalty,
            seed=req.seed, max_tokens=max_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
            min_tokens=req.min_tokens,
            logit_bias=bias,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=skip_special_tokens,
            cache_salt=req.cache_salt,
            structured_outputs=structured_outputs,
        )
        for ids in prompts:
            self.processor.validate(ids, params, prompt_field)
        return params

    def check_token_ids(self, ids: list[int], param: str) -> None:
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise APIError(400, f"token id {t} at position {i} is outside the vocabulary "
                               f"[0, {self.vocab_size})", param=param)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()
