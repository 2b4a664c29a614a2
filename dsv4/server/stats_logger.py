"""StatsLogger: a periodic engine-load line on the ``dsv4.stats`` logger while the server is busy.

    running: 2 reqs, waiting: 1 reqs, KV cache usage: 12.5%, prompt throughput: 310.4 tokens/s,
    generation throughput: 42.0 tokens/s, prefix cache hit rate: 87.5%  (one line)

Every ``interval`` seconds (10 in ``dsv4 serve``) it reads the scheduler's running / waiting
counts and KV-cache usage on the engine thread (the same read as /metrics) and the token totals
the server keeps (``ServerMetrics``), and logs the rates over the time since the last line.
Prompt throughput counts the prompt tokens of requests admitted in the interval; generation
throughput the tokens streamed to clients; the prefix cache hit rate (when requests were
admitted since the last line) the prompt tokens found cached over those looked up. A line is logged only while there is activity: when
requests run or wait or tokens moved, plus one line after the server goes idle, so the last
line shows it drained. Runs as an asyncio task for the app's lifespan (``lifespan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from dsv4.engine.outputs import EngineStats

from dsv4.server.metrics import ServerMetrics, read_engine_stats

__all__ = ["StatsLogger"]

logger = logging.getLogger("dsv4.stats")


class StatsLogger:
    def __init__(self, metrics: ServerMetrics,
                 get_stats: Callable[[], Awaitable[EngineStats]],
                 interval: float = 10.0) -> None:
        if not interval > 0:
            raise ValueError(f"stats interval must be positive, got {interval}")
        self.metrics, self.get_stats, self.interval = metrics, get_stats, interval
        self._last_time = time.monotonic()
        self._last_prompt = metrics.prompt_tokens_total
        self._last_generation = metrics.generation_tokens_total
        self._was_active = False
        self._last_prefix = (0, 0)  # the engine's prefix-cache queries and hits
        self._last_spec = (0, 0, 0)  # the engine's spec-decode rows, drafts, accepted drafts

    async def log_once(self) -> str | None:
        """Log one line if there was activity since the last call (or the one before); the
        line, or None when nothing was logged."""
        stats = await read_engine_stats(self.get_stats)
        now = time.monotonic()
        prompt, generation = self.metrics.prompt_tokens_total, self.metrics.generation_tokens_total
        seconds = max(now - self._last_time, 1e-9)
        d_prompt, d_generation = prompt - self._last_prompt, generation - self._last_generation
        self._last_time, self._last_prompt, self._last_generation = now, prompt, generation
        prefix = ""
        if stats is None:  # engine busy past the timeout, or gone: say so, keep the rates
            load, active = "running: ?, waiting: ?, KV cache usage: ?", False
        else:
            load = (f"running: {stats.num_running} reqs, waiting: {stats.num_waiting} reqs, "
                    f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%")
            queries = stats.prefix_cache_queries - self._last_prefix[0]
            hits = stats.prefix_cache_hits - self._last_prefix[1]
            self._last_prefix = (stats.prefix_cache_queries, stats.prefix_cache_hits)
            if queries > 0:  # admissions since the last line
                prefix = f", prefix cache hit rate: {100 * hits / queries:.1f}%"
            spec = (stats.spec_num_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens)
            rows, drafts, accepted = (a - b for a, b in zip(spec, self._last_spec))
            self._last_spec = spec
            if rows > 0:  # tokens a verifying row gains per step, and the drafts' acceptance
                prefix += (f", spec decode: mean accepted length {1 + accepted / rows:.2f}, "
                           f"acceptance {100 * accepted / max(drafts, 1):.1f}%")
            active = bool(stats.num_running or stats.num_waiting)
        active = active or d_prompt > 0 or d_generation > 0
        if not (active or self._was_active):
            return None
        self._was_active = active
        line = (f"{load}, prompt throughput: {d_prompt / seconds:.1f} tokens/s, "
                f"generation throughput: {d_generation / seconds:.1f} tokens/s{prefix}")
        logger.info("%s", line)
        return line

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.log_once()
            except Exception:  # noqa: BLE001 - a stats line must never stop the server
                logger.debug("stats line failed", exc_info=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        """FastAPI lifespan: log while the app runs, stop with it."""
        self._last_time = time.monotonic()
        task = asyncio.create_task(self._loop(), name="dsv4-stats")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
