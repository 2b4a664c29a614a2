"""FastAPI app factory: OpenAI- and Anthropic-compatible endpoints over one AsyncLLM.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (OpenAI Responses),
POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages), GET /v1/models,
GET /health, GET /metrics (Prometheus), POST /tokenize, POST /detokenize. With an API key, every
route but /health and /metrics needs ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.
Errors are OpenAI-shaped (see ``dsv4.server.errors``), Anthropic-shaped on the Messages routes;
request bodies are read up to a size limit and parsed (malformed JSON is a 400, never a crash;
limits and chat rules: ``dsv4.server.validation``). Generation requests of every API are served
by ``dsv4.server.api_serve.serve_events``: admitted (engine validation included) before the
200, cancelled when the client goes away, a 500 for one failing request that never affects
the others, open streams ended with an error event at shutdown and waiting non-streaming
requests answered with a 503. Parsing, rendering and tokenizing a request run in a worker
thread, so a long prompt never stalls other streams or /health. Each request is logged on
dsv4.access (AccessLogMiddleware) and the engine's load on dsv4.stats while busy
(StatsLogger).
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from dsv4.async_llm import AsyncLLM
from dsv4.errors import InvalidRequestError
from dsv4.server.access_log import AccessLogMiddleware
from dsv4.server.anthropic import count_tokens, prepare_messages
from dsv4.server.anthropic_protocol import CountTokensRequest, MessagesRequest, anthropic_error
from dsv4.server.api_serve import ErrorShape, EventRun, OpenAIEvents, openai_error, serve_events
from dsv4.server.chat import prepare_chat, render_chat_prompt
from dsv4.server.completions import prepare_completion
from dsv4.server.errors import install_error_handlers
from dsv4.server.metrics import CONTENT_TYPE_LATEST
from dsv4.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from dsv4.server.responses import prepare_responses
from dsv4.server.responses_protocol import ResponsesRequest, ResponseStore
from dsv4.server.state import ServerState
from dsv4.server.stats_logger import StatsLogger
from dsv4.server.validation import body_limit, read_body
from dsv4.tokenizer import Tokenizer

__all__ = ["build_app"]

def build_app(async_llm: AsyncLLM, tokenizer: Tokenizer, model_name: str | list[str], *,
              api_key: str | None = None, effort_profile: str = "preview",
              model_root: str | None = None, default_thinking: bool = True,
              max_body_bytes: int | None = None, log_requests: bool = True,
              log_stats: bool = True, stats_interval: float = 10.0) -> FastAPI:
    """The OpenAI-compatible app. ``model_name``: the served name(s); requests may name any of
    them (or none). ``effort_profile``: "preview" or "0731" (see dsv4.encoding_effort).
    ``default_thinking``: the chat mode of a request that does not name one.
    ``max_body_bytes``: larger request bodies are a 413 (default: ``validation.body_limit``).
    ``log_requests``: an access line per request (dsv4.access); ``log_stats``: a load line every
    ``stats_interval`` seconds while busy (dsv4.stats)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    state = ServerState(async_llm, tokenizer, names, effort_profile, api_key, model_root,
                        default_thinking)
    stats_logger = (StatsLogger(state.metrics, async_llm.get_stats, stats_interval)
                    if log_stats else None)
    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None,
                  lifespan=stats_logger.lifespan if stats_logger else None)
    app.state.dsv4 = state
    if log_requests:
        app.add_middleware(AccessLogMiddleware)

    install_error_handlers(app)
    max_body = max_body_bytes or body_limit(state.max_model_len)

    async def body(request: Request) -> bytes:
        return await read_body(request, max_body)

    def check_key(request: Request) -> None:
        """``Authorization: Bearer KEY`` (OpenAI) or ``x-api-key: KEY`` (Anthropic)."""
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            what = "Missing" if not token else "Incorrect"
            raise APIError(401, f"{what} API key (send Authorization: Bearer KEY or "
                           "x-api-key: KEY)", code="invalid_api_key")

    async def auth(request: Request) -> None:
        check_key(request)

    protected = [Depends(auth)]

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if async_llm.is_alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(async_llm.get_stats),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "dsv4",
                 "root": state.model_root or name, "parent": None,
                 "max_model_len": state.max_model_len} for name in state.model_names]
        return {"object": "list", "data": data}

    def generation(path: str, endpoint: str, model: type[BaseModel],
                   prepare: Callable[[Any, dict[str, Any]], EventRun],
                   shape: ErrorShape) -> None:
        """Route ``path``: parse the body as ``model``, ``prepare`` the run (worker thread),
        serve it (``serve_events``) with errors in ``shape``."""
        async def handler(request: Request) -> Response:
            def start(data: bytes) -> EventRun:
                req, raw = parse_request(data, model)
                return prepare(req, raw)

            return await serve_events(state, request, endpoint, start, body, shape, check_key)

        app.post(path)(handler)

    def anthropic_shape(status: int, message: str, *_: Any) -> dict[str, Any]:
        return anthropic_error(status, message)

    store = ResponseStore()
    generation("/v1/chat/completions", "chat", ChatCompletionRequest,
               lambda req, raw: OpenAIEvents(prepare_chat(state, req, raw)), openai_error)
    generation("/v1/completions", "completions", CompletionRequest,
               lambda req, _: OpenAIEvents(prepare_completion(state, req)), openai_error)
    generation("/v1/messages", "messages", MessagesRequest,
               lambda req, raw: prepare_messages(state, req, raw), anthropic_shape)
    generation("/v1/responses", "responses", ResponsesRequest,
               lambda req, _: prepare_responses(state, req, store), openai_error)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request) -> Response:
        try:
            check_key(request)
            req, raw = parse_request(await body(request), CountTokensRequest)
            count = await asyncio.to_thread(count_tokens, state, req, raw)  # type: ignore[arg-type]
        except (APIError, InvalidRequestError) as exc:
            err = exc if isinstance(exc, APIError) else APIError.invalid(exc)
            return JSONResponse(anthropic_error(err.status, err.message), status_code=err.status)
        return JSONResponse({"input_tokens": count})

    @app.post("/tokenize", dependencies=protected)
    async def tokenize(request: Request) -> dict[str, Any]:
        def work(data: bytes) -> dict[str, Any]:
            req, raw = parse_request(data, TokenizeRequest)
            state.check_model(req.model)  # type: ignore[attr-defined]
            if (req.prompt is None) == (req.messages is None):  # type: ignore[attr-defined]
                raise APIError(400, "give exactly one of prompt or messages", param="prompt")
            text = req.prompt  # type: ignore[attr-defined]
            if text is None:
                text = render_chat_prompt(state, raw)
            ids = state.processor.tokenize(text, "prompt" if req.prompt else "messages")
            out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len,
                                   "tokens": ids}
            if req.messages is not None:  # type: ignore[attr-defined]
                out["prompt"] = text
            if req.return_token_strs:  # type: ignore[attr-defined]
                out["token_strs"] = [state.token_text(t) for t in ids]
            return out

        return await asyncio.to_thread(work, await body(request))

    @app.post("/detokenize", dependencies=protected)
    async def detokenize(request: Request) -> dict[str, Any]:
        def work(data: bytes) -> dict[str, Any]:
            req, _ = parse_request(data, DetokenizeRequest)
            state.check_model(req.model)  # type: ignore[attr-defined]
            state.check_token_ids(req.tokens, "tokens")  # type: ignore[attr-defined]
            return {"prompt": tokenizer.decode(req.tokens)}  # type: ignore[attr-defined]

        return await asyncio.to_thread(work, await body(request))

    return app
