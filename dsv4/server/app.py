"""FastAPI app factory: OpenAI-compatible endpoints over one AsyncLLM.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus), POST /tokenize, POST /detokenize. With an API key, every route but
/health and /metrics needs ``Authorization: Bearer KEY``. Every error is OpenAI-shaped; request
bodies are parsed here (malformed JSON is a 400, never a crash). A streaming request is admitted
(engine validation included) before its 200 is sent; a client that goes away mid-request is
cancelled, which aborts its engine requests and frees their cache. One failing request is
answered with a 500 and never affects the others. Each request is logged on dsv4.access
(AccessLogMiddleware) and the engine's load on dsv4.stats while busy (StatsLogger).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.async_llm import AsyncLLM, EngineDeadError
from dsv4.server.access_log import AccessLogMiddleware
from dsv4.server.chat import ChatRun, prepare_chat, render_chat_prompt
from dsv4.server.completions import CompletionRun, prepare_completion
from dsv4.server.generation import RequestRejected
from dsv4.server.metrics import CONTENT_TYPE_LATEST
from dsv4.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    parse_request,
)
from dsv4.server.state import SSE_DONE, ClientGone, ServerState, sse, until_disconnect
from dsv4.server.stats_logger import StatsLogger
from dsv4.tokenizer import Tokenizer

__all__ = ["build_app"]

logger = logging.getLogger(__name__)


def build_app(async_llm: AsyncLLM, tokenizer: Tokenizer, model_name: str | list[str], *,
              api_key: str | None = None, effort_profile: str = "preview",
              max_model_len: int | None = None, model_root: str | None = None,
              log_requests: bool = True, log_stats: bool = True,
              stats_interval: float = 10.0) -> FastAPI:
    """The OpenAI-compatible app. ``model_name``: the served name(s); requests may name any of
    them (or none). ``effort_profile``: "preview" or "0731" (see dsv4.encoding_effort).
    ``log_requests``: an access line per request (dsv4.access); ``log_stats``: a load line every
    ``stats_interval`` seconds while busy (dsv4.stats)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    engine = async_llm.engine
    state = ServerState(async_llm, tokenizer, names,
                        max_model_len or engine.config.max_model_len,
                        engine.model_config.vocab_size, effort_profile, api_key, model_root)
    stats_logger = StatsLogger(state.metrics, async_llm.run, stats_interval) if log_stats else None
    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None,
                  lifespan=stats_logger.lifespan if stats_logger else None)
    app.state.dsv4 = state
    if log_requests:
        app.add_middleware(AccessLogMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    async def auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 state.api_key.encode()):
            what = "Missing" if not header else "Incorrect"
            raise APIError(401, f"{what} API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    protected = [Depends(auth)]

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if async_llm.is_alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(async_llm.run),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "dsv4",
                 "root": state.model_root or name, "parent": None,
                 "max_model_len": state.max_model_len} for name in state.model_names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request) -> Response:
        async def start() -> ChatRun:
            req, raw = parse_request(await request.body(), ChatCompletionRequest)
            return prepare_chat(state, req, raw)  # type: ignore[arg-type]

        return await _serve(state, request, "chat", start)

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: Request) -> Response:
        async def start() -> CompletionRun:
            req, _ = parse_request(await request.body(), CompletionRequest)
            return prepare_completion(state, req)  # type: ignore[arg-type]

        return await _serve(state, request, "completions", start)

    @app.post("/tokenize", dependencies=protected)
    async def tokenize(request: Request) -> dict[str, Any]:
        req, raw = parse_request(await request.body(), TokenizeRequest)
        state.check_model(req.model)  # type: ignore[attr-defined]
        if (req.prompt is None) == (req.messages is None):  # type: ignore[attr-defined]
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        text = req.prompt  # type: ignore[attr-defined]
        if text is None:
            text = render_chat_prompt(state, raw)
        ids = tokenizer.encode(text)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len,
                               "tokens": ids}
        if req.messages is not None:  # type: ignore[attr-defined]
            out["prompt"] = text
        if req.return_token_strs:  # type: ignore[attr-defined]
            out["token_strs"] = [state.token_text(t) for t in ids]
        return out

    @app.post("/detokenize", dependencies=protected)
    async def detokenize(request: Request) -> dict[str, Any]:
        req, _ = parse_request(await request.body(), DetokenizeRequest)
        state.check_model(req.model)  # type: ignore[attr-defined]
        state.check_token_ids(req.tokens, "tokens")  # type: ignore[attr-defined]
        return {"prompt": tokenizer.decode(req.tokens)}  # type: ignore[attr-defined]

    return app


Run = ChatRun | CompletionRun


async def _serve(state: ServerState, request: Request, endpoint: str,
                 start: Callable[[], Awaitable[Run]]) -> Response:
    """Admit, run and answer one generation request, recording its outcome."""
    metrics = state.metrics
    try:
        run = await start()
        request.state.stats = run.gen.stats  # the access log reports its token counts
        stream = run.gen.stream()
        if run.req.stream:
            first = await until_disconnect(request, _first(stream))
            return StreamingResponse(_sse(state, endpoint, run, stream, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        response = await until_disconnect(request, run.collect(stream))
    except APIError as exc:
        metrics.outcome(endpoint, "rejected" if exc.status < 500 else "error")
        return JSONResponse(exc.body(), status_code=exc.status)
    except RequestRejected as exc:
        metrics.outcome(endpoint, "rejected")
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)
    except ClientGone:
        metrics.outcome(endpoint, "aborted")
        return Response(status_code=499)
    except EngineDeadError as exc:
        metrics.outcome(endpoint, "error")
        return JSONResponse(error_body(str(exc), "server_error"), status_code=503)
    except Exception as exc:  # noqa: BLE001 - one bad request must not take the server down
        logger.exception("%s request failed", endpoint)
        metrics.outcome(endpoint, "error")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"),
                            status_code=500)
    metrics.outcome(endpoint, "success")
    run.gen.stats.done()  # type: ignore[union-attr]
    return JSONResponse(response.dump())


async def _first(stream: AsyncIterator[Any]) -> Any:
    """The first delta, so an engine rejection is still a 400 (nothing has been sent)."""
    try:
        return await stream.__anext__()
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise


async def _sse(state: ServerState, endpoint: str, run: Run, stream: AsyncIterator[Any],
               first: Any) -> AsyncIterator[str]:
    outcome = "aborted"
    include_usage = bool(run.req.stream_options and run.req.stream_options.include_usage)
    try:
        for payload in run.first_chunks():
            yield sse(payload)
        delta = first
        while delta is not None:
            for payload in run.chunks(delta):
                yield sse(payload)
            delta = await anext(stream, None)
        if include_usage:
            yield sse(run.usage_chunk())
        yield SSE_DONE
        outcome = "success"
        run.gen.stats.done()  # type: ignore[union-attr]
    except Exception as exc:  # noqa: BLE001 - reported in-stream; the server carries on
        logger.exception("%s stream failed", endpoint)
        outcome = "error"
        yield sse(error_body(f"internal error: {exc}", "server_error"))
        yield SSE_DONE
    finally:
        state.metrics.outcome(endpoint, outcome)
        await stream.aclose()  # type: ignore[attr-defined]
