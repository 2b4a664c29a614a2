"""AsyncLLM: the asyncio face of LLMEngine, for the server (and any async caller).

One background thread owns the engine and is the only one that touches it: requests, aborts and
text-level stops arrive through a FIFO command queue and are applied between steps, so the engine
needs no locks. ``generate()`` streams one completion's ``EngineOutput`` deltas.

Cancellation is safe at every point. The stream is registered before the request's ``add``
command is queued, and leaving ``generate()`` early for any reason (a cancelled task, a client
that went away, an exception) queues an ``abort`` behind that ``add``: the FIFO order means the
abort always finds the request (or finds it already rejected or finished, and does nothing), so
no request outlives its caller. A duplicate request id is rejected while the first is open.
``shutdown()`` fails every open stream with ``EngineDeadError``. A failing step fails (and
aborts) the requests of that step only; the loop keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from dsv4.engine.outputs import EngineOutput, EngineStats, StepError, WorkerDiedError
from dsv4.errors import InvalidRequestError
from dsv4.sampling_params import SamplingParams
from dsv4.structured_outputs import GrammarCompiler
from dsv4.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.engine_args import EngineArgs

__all__ = ["AsyncLLM", "EngineDeadError"]

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or failed); no request can be served."""


_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # open generate() calls, by request id
        self._lock = threading.Lock()  # guards _streams and _stopped against the engine thread
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *, progress: bool = False,
                         eos_token_id: int | None = None) -> AsyncLLM:
        return cls(args.create_engine(progress=progress, eos_token_id=eos_token_id))

    # ---- facts fixed at build time ---------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def enable_structured_outputs(self, tokenizer: Tokenizer) -> GrammarCompiler:
        """Turn on structured outputs (see ``LLMEngine.enable_structured_outputs``); the returned
        compiler checks specs in any thread, before a request is submitted."""
        return self.engine.enable_structured_outputs(tokenizer)

    # ---- public API (any thread with a running event loop) -------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[EngineOutput]:
        """Stream one completion's EngineOutput deltas until it finishes.

        Raises InvalidRequestError (before yielding anything) for a request the engine
        rejects, EngineDeadError once the engine has stopped."""
        rid = request_id or f"req-{next(self._ids)}"
        entry: _Stream = (asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._stopped:
                raise EngineDeadError("the engine has stopped")
            if rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already in use",
                                          param="request_id")
            self._streams[rid] = entry
        done = False
        try:
            self._submit(lambda: self._add(rid, prompt_token_ids, params))
            while not done:
                item = await entry[1].get()
                if isinstance(item, BaseException):
                    done = isinstance(item, InvalidRequestError)  # rejected: nothing to abort
                    raise item
                done = item.finished
                yield item
        finally:
            with self._lock:
                if self._streams.get(rid) is entry:
                    del self._streams[rid]
            if not done:  # cancelled or failed mid-way: the abort runs after the add
                self._submit(lambda: self.engine.abort_request(rid))

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort_request(request_id))

    def finish(self, request_id: str, stop_reason: str) -> None:
        """End a completion early (a stop string matched in the text layer); its stream gets a
        final finished output."""

        def finish() -> None:
            for out in self.engine.finish_request(request_id, stop_reason):
                self._deliver(out.request_id, out)

        self._submit(finish)

    async def get_stats(self) -> EngineStats:
        """The engine's load, read between steps."""
        return await asyncio.wrap_future(self.run(lambda engine: engine.stats()))

    def run(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the engine thread between steps (stats, tests)."""
        done: Future = Future()

        def call() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001
                    done.set_exception(exc)

        self._submit(call)
        return done

    def begin_shutdown(self) -> None:
        """Stop taking requests and fail every open stream with EngineDeadError now, without
        waiting for the engine thread (a server's signal handler calls this). When a worker
        rank is gone, that is the reason the streams get: the server's watchdog may see the
        death and shut down before the engine thread's step fails on it."""
        with self._lock:
            self._stopped = True
        self._commands.put(lambda: None)  # wake an idle loop
        failure = self.engine.failure()
        reason = f"the engine stopped: {failure}" if failure else "the server is shutting down"
        self._fail_streams(lambda: EngineDeadError(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; every open stream fails with EngineDeadError."""
        self.begin_shutdown()
        self._thread.join(timeout)
        # a thread still inside a step owns the workers' control channel: end them without it
        self.engine.shutdown(graceful=not self._thread.is_alive())

    def failure(self) -> str | None:
        """Why the engine cannot serve any more (a worker rank died or hung), or None."""
        return self.engine.failure()

    @property
    def is_alive(self) -> bool:
        """False once shut down or failed, and as soon as a worker rank of a multi-process
        engine is gone (the server's /health answers 503)."""
        return self._thread.is_alive() and not self._stopped and self.engine.failure() is None

    # ---- engine thread ---------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)

    def _add(self, rid: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.add_request(rid, prompt_token_ids, params)
        except Exception as exc:  # noqa: BLE001 - handed to the caller's stream
            self._deliver(rid, exc)

    def _loop(self) -> None:
        while not self._stopped:
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            if command is not None:
                self._run_command(command)
                continue  # drain all pending commands before the next step
            try:
                outputs = self.engine.step()
            except WorkerDiedError as exc:  # a rank is gone: nothing can be served any more
                logger.error("engine stopped: %s", exc)
                with self._lock:
                    self._stopped = True
                stopped = f"the engine stopped: {exc}"
                self._fail_streams(lambda: EngineDeadError(stopped))
                return
            except StepError as exc:  # that step's requests were aborted by the engine
                logger.exception("engine step failed; failing its requests")
                for rid in exc.request_ids:
                    self._deliver(rid, RuntimeError(str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - outside a step: fail everything open
                logger.exception("engine failed outside a step; failing all requests")
                with self._lock:
                    open_ids = list(self._streams)
                for rid in open_ids:
                    self._run_command(lambda rid=rid: self.engine.abort_request(rid))
                failed = f"engine step failed: {exc}"
                self._fail_streams(lambda: RuntimeError(failed))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _run_command(self, command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:  # noqa: BLE001
            logger.exception("engine command failed")

    def _deliver(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            _put(target, item)

    def _fail_streams(self, error: Callable[[], BaseException]) -> None:
        with self._lock:
            targets = list(self._streams.values())
        for target in targets:
            _put(target, error())


def _put(target: _Stream, item: object) -> None:
    loop, stream = target
    try:
        loop.call_soon_threadsafe(stream.put_nowait, item)
    except RuntimeError:  # that caller's event loop is closed: nobody is listening
        pass
