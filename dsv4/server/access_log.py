"""AccessLogMiddleware: one line per HTTP request on the ``dsv4.access`` logger.

    127.0.0.1:51234 "POST /v1/completions HTTP/1.1" 200 prompt_tokens=12 completion_tokens=32
    latency=1.204s  (one line)

It replaces uvicorn's access log (which the server turns off) so a line can carry what only the
app knows: the token counts of a generation request. An endpoint hands them over by putting its
RequestStats on ``request.state.stats``; requests without one (models, tokenize, errors
before admission) log status and latency only. Latency runs from the first byte of the request
to the last byte of the response, so a stream's line comes when the stream ends. A request that
raised before answering is logged as 500 (what the outer error handler then sends).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AccessLogMiddleware"]

logger = logging.getLogger("dsv4.access")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        # request.state is this dict (Starlette keeps it in the scope), so the endpoint's
        # RequestStats is visible here after the call
        request_state: dict[str, Any] = scope.setdefault("state", {})
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status = status or 500
            raise
        finally:
            if logger.isEnabledFor(logging.INFO):
                logger.info("%s", _line(scope, status, request_state.get("stats"),
                                        time.monotonic() - start))


def _line(scope: Scope, status: int | None, stats: Any, seconds: float) -> str:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    target = scope.get("path", "")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    request_line = f'{scope.get("method", "-")} {target} HTTP/{scope.get("http_version", "1.1")}'
    parts = [f'{who} "{request_line}"', str(status) if status is not None else "-"]
    if stats is not None:
        parts.append(f"prompt_tokens={stats.num_prompt_tokens} "
                     f"completion_tokens={stats.num_generation_tokens}")
    parts.append(f"latency={seconds:.3f}s")
    return " ".join(parts)
