"""OpenAI's error shape for every answer that is not a success, whatever raised it.

``APIError`` is what request handling raises on purpose (a 4xx naming the field, or a 5xx).
``install_error_handlers`` makes the app answer everything else in the same shape: unknown
routes (404 ``Invalid URL (GET /x)``), wrong methods (405, with ``Allow``), and any exception
that escapes an endpoint (500, logged once here with its traceback; the connection stays usable
and the server carries on). Nothing the server answers is plain text, except uvicorn's own reply
to bytes that are not HTTP at all.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.errors import InvalidRequestError

__all__ = ["APIError", "error_body", "install_error_handlers"]

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def invalid(cls, exc: InvalidRequestError) -> APIError:
        """The 400 for a validation error raised below the server (its param and code)."""
        return cls(400, str(exc), param=exc.param, code=exc.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def install_error_handlers(app: FastAPI) -> None:
    """APIError and HTTP errors as OpenAI-shaped JSON, and a 500 for anything unexpected."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return JSONResponse(APIError.invalid(exc).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"Invalid URL ({where})"
        elif exc.status_code == 405:
            message = f"Method not allowed ({where}); allowed: " \
                      f"{(exc.headers or {}).get('Allow', 'none')}"
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                            headers=exc.headers)

    app.add_middleware(_InternalErrors)


class _InternalErrors:
    """ASGI middleware: an exception no handler took becomes a logged, OpenAI-shaped 500.

    It sits inside Starlette's ServerErrorMiddleware, which would answer plain text and log the
    exception a second time. A response already under way (a stream) cannot be replaced: then
    the exception goes on to uvicorn, which logs it and closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            response = JSONResponse(error_body(f"internal error: {exc}", "server_error"),
                                    status_code=500)
            await response(scope, receive, send)
