"""Serving one generation request of any API: admission, the answer or its event stream, errors.

The request is parsed, rendered and tokenized in a worker thread and admitted (engine
validation included) before a 200 is sent; a client that goes away mid-request is cancelled,
which aborts its engine requests and frees their cache; one failing request is answered in its
API's error shape (a logged 500 for anything unexpected) and never affects the others; at
shutdown an open stream ends with an error event. Each API's run supplies its answer and events
(``EventRun``: chat completions and completions through ``OpenAIEvents``, Messages and
Responses directly) and the app its error shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv4.async_llm import EngineDeadError
from dsv4.errors import InvalidRequestError
from dsv4.output_processor import Delta
from dsv4.server.errors import APIError
from dsv4.server.generation import Generation
from dsv4.server.state import SSE_DONE, ClientGone, ServerState, sse, until_disconnect

__all__ = ["ErrorShape", "EventRun", "OpenAIEvents", "openai_error", "renamed_fields",
           "serve_events"]

logger = logging.getLogger(__name__)

ErrorShape = Callable[[int, str, "str | None", "str | None"], dict[str, Any]]


class EventRun(Protocol):
    gen: Generation
    streaming: bool

    async def collect(self, stream: AsyncIterator[Delta]) -> dict[str, Any]: ...

    def sse_start(self) -> list[str]: ...

    def sse(self, delta: Delta) -> list[str]: ...

    def sse_end(self) -> list[str]: ...

    def sse_error(self, status: int, message: str) -> list[str]: ...


def openai_error(status: int, message: str, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    return APIError(status, message, param, code).body()


class OpenAIEvents:
    """A chat-completions or completions run as an ``EventRun``: OpenAI's SSE chunks, the usage
    chunk when ``stream_options.include_usage`` asks for it, and ``data: [DONE]``."""

    def __init__(self, run: Any) -> None:  # ChatRun | CompletionRun
        self.run, self.gen, self.streaming = run, run.gen, run.req.stream

    async def collect(self, stream: AsyncIterator[Delta]) -> dict[str, Any]:
        return (await self.run.collect(stream)).dump()

    def sse_start(self) -> list[str]:
        return [sse(payload) for payload in self.run.first_chunks()]

    def sse(self, delta: Delta) -> list[str]:
        return [sse(payload) for payload in self.run.chunks(delta)]

    def sse_end(self) -> list[str]:
        options = self.run.req.stream_options
        usage = [sse(self.run.usage_chunk())] if options and options.include_usage else []
        return [*usage, SSE_DONE]

    def sse_error(self, status: int, message: str) -> list[str]:
        code = "engine_unavailable" if status == 503 else None
        return [sse(openai_error(status, message, code=code)), SSE_DONE]


def renamed_fields(exc: APIError | InvalidRequestError, names: dict[str, str]) -> APIError:
    """A 4xx raised while serving the chat request of another API, with the chat field names
    (``max_tokens``, ``stop``) written as that API's (``max_output_tokens``,
    ``stop_sequences``)."""
    err = exc if isinstance(exc, APIError) else APIError.invalid(exc)
    if err.param in names:
        new = names[err.param]
        return APIError(err.status, err.message.replace(err.param, new), new, err.code,
                        err.type)
    return err


async def serve_events(state: ServerState, request: Request, endpoint: str,
                       start: Callable[[bytes], EventRun],
                       read: Callable[[Request], Awaitable[bytes]],
                       shape: ErrorShape, auth: Callable[[Request], None]) -> Response:
    """Authenticate, admit, run and answer one request; every error in ``shape``."""
    metrics = state.metrics

    def fail(status: int, message: str, param: str | None = None, code: str | None = None,
             outcome: str | None = None) -> Response:
        metrics.outcome(endpoint, outcome or ("rejected" if status < 500 else "error"))
        return JSONResponse(shape(status, message, param, code), status_code=status)

    try:
        auth(request)
        run = await asyncio.to_thread(start, await read(request))
        request.state.stats = run.gen.stats  # the access log reports its token counts
        stream = run.gen.stream()
        if run.streaming:
            first = await until_disconnect(request, _first(stream))
            return StreamingResponse(_sse(state, endpoint, run, stream, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await until_disconnect(request, run.collect(stream))
    except APIError as exc:
        return fail(exc.status, exc.message, exc.param, exc.code)
    except InvalidRequestError as exc:
        return fail(400, str(exc), exc.param, exc.code)
    except ClientGone:
        metrics.outcome(endpoint, "aborted")
        return Response(status_code=499)
    except EngineDeadError as exc:
        return fail(503, str(exc), code="engine_unavailable", outcome="error")
    except Exception as exc:  # noqa: BLE001 - one bad request must not take the server down
        logger.exception("%s request failed", endpoint)
        return fail(500, f"internal error: {exc}")
    metrics.outcome(endpoint, "success")
    run.gen.stats.done()  # type: ignore[union-attr]
    return JSONResponse(body)


async def _first(stream: AsyncIterator[Delta]) -> Delta | None:
    """The first delta, so an engine rejection is still a 4xx (nothing has been sent)."""
    try:
        return await anext(stream, None)
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise


async def _sse(state: ServerState, endpoint: str, run: EventRun, stream: AsyncIterator[Delta],
               first: Delta | None) -> AsyncIterator[str]:
    outcome = "aborted"
    try:
        for text in run.sse_start():
            yield text
        delta = first
        while delta is not None:
            for text in run.sse(delta):
                yield text
            delta = await anext(stream, None)
        for text in run.sse_end():
            yield text
        outcome = "success"
        run.gen.stats.done()  # type: ignore[union-attr]
    except EngineDeadError as exc:  # shutdown: end the stream cleanly, no traceback
        logger.info("%s stream ended: %s", endpoint, exc)
        outcome = "error"
        for text in run.sse_error(503, str(exc)):
            yield text
    except Exception as exc:  # noqa: BLE001 - reported in-stream; the server carries on
        logger.exception("%s stream failed", endpoint)
        outcome = "error"
        for text in run.sse_error(500, f"internal error: {exc}"):
            yield text
    finally:
        state.metrics.outcome(endpoint, outcome)
        await stream.aclose()  # type: ignore[attr-defined]
