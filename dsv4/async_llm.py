"""AsyncLLM: the asyncio face of LLMEngine, for the server (and any async caller).

One background thread owns the engine and is the only one that touches it: requests, aborts and
text-level stops arrive through a command queue and are applied between steps, so the engine
needs no locks. `generate()` is an async iterator of EngineOutput deltas; cancelling it (a client
that went away) aborts the request, which frees its cache blocks before the next step. A failing
step fails (and aborts) the requests of that step only; the loop keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from dsv4.engine.llm_engine import EngineOutput, LLMEngine, StepError
from dsv4.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "EngineDeadError"]

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    # ---- public API (any thread with a running event loop) -------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[EngineOutput]:
        """Stream EngineOutput deltas until every completion of the request has finished.

        Raises ValueError (before yielding anything) for a request the engine rejects."""
        if self._stopped.is_set():
            raise EngineDeadError("the engine has stopped")
        rid = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        added: Future = Future()
        self._streams[rid] = (loop, stream)

        def add() -> None:
            try:
                self.engine.add_request(rid, prompt_token_ids, params)
                added.set_result(None)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                added.set_exception(exc)

        self._submit(add)
        try:
            await asyncio.wrap_future(added)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        open_completions = params.n
        try:
            while open_completions:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    open_completions -= 1
                yield item
        finally:
            self._streams.pop(rid, None)
            if open_completions:  # cancelled or failed mid-way: free its cache now
                self._submit(lambda: self.engine.abort_request(rid))

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort_request(request_id))

    def finish(self, request_id: str, index: int, stop_reason: str) -> None:
        """End one completion early (a stop string matched in the text layer); its stream
        gets a final finished output."""

        def finish() -> None:
            for out in self.engine.finish_request(request_id, index, stop_reason):
                self._deliver(out.request_id, out)

        self._submit(finish)

    def run(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the engine thread between steps (stats, tests)."""
        done: Future = Future()

        def call() -> None:
            try:
                done.set_result(fn(self.engine))
            except Exception as exc:  # noqa: BLE001
                done.set_exception(exc)

        self._submit(call)
        return done

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    # ---- engine thread ---------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy, timeout=None if not busy else 0)
            except queue.Empty:
                command = None
            if command is not None:
                self._run_command(command)
                continue  # drain all pending commands before the next step
            try:
                outputs = self.engine.step()
            except StepError as exc:  # that step's requests were aborted by the engine
                logger.exception("engine step failed; failing its requests")
                for rid in exc.request_ids:
                    self._deliver(rid, RuntimeError(str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - outside a step: fail everything open
                logger.exception("engine failed outside a step; failing all requests")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _run_command(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:  # noqa: BLE001
            logger.exception("engine command failed")

    def _deliver(self, request_id: str, item: object) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self._streams):
            self._run_command(lambda rid=rid: self.engine.abort_request(rid))
            self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
