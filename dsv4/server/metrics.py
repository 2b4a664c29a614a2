"""Prometheus metrics of one server (vLLM-style names with a ``dsv4:`` prefix).

Each app owns its registry, so several servers in one process (tests) never collide. Request
outcomes, token counts and latency histograms are recorded as requests run (``RequestStats``);
the running / waiting / KV-usage gauges are read from the engine thread at scrape time. The
token totals are also kept as plain counts (``prompt_tokens_total``, ``generation_tokens_total``)
and each RequestStats keeps its own, for the stats line and the access log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dsv4.engine.outputs import EngineStats

__all__ = ["CONTENT_TYPE_LATEST", "RequestStats", "ServerMetrics", "read_engine_stats"]

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, m = self.registry, ["model_name"]
        self.requests = Counter("dsv4:requests", "Requests by endpoint and outcome "
                                "(success, rejected, error, aborted).",
                                m + ["endpoint", "outcome"], registry=reg)
        self.finished = Counter("dsv4:request_success", "Finished completions by finish reason.",
                                m + ["finished_reason"], registry=reg)
        self.prompt_tokens = Counter("dsv4:prompt_tokens", "Prompt tokens processed.", m,
                                     registry=reg)
        self.generation_tokens = Counter("dsv4:generation_tokens", "Tokens generated.", m,
                                         registry=reg)
        self.ttft = Histogram("dsv4:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=_TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("dsv4:inter_token_latency_seconds", "Time between output tokens.",
                             m, buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("dsv4:e2e_request_latency_seconds", "Request latency, end to end.",
                             m, buckets=_E2E_BUCKETS, registry=reg)
        self.running = Gauge("dsv4:num_requests_running", "Requests running in the engine.", m,
                             registry=reg)
        self.waiting = Gauge("dsv4:num_requests_waiting", "Requests waiting in the engine.", m,
                             registry=reg)
        self.kv_usage = Gauge("dsv4:kv_cache_usage_perc", "KV-cache usage (1 = full).", m,
                              registry=reg)
        # vLLM's prefix-cache counters, in tokens: looked up at admission, and found cached
        self.prefix_queries = Counter("dsv4:prefix_cache_queries", "Prompt tokens looked up in "
                                      "the prefix cache.", m, registry=reg)
        self.prefix_hits = Counter("dsv4:prefix_cache_hits", "Prompt tokens found in the prefix "
                                   "cache.", m, registry=reg)
        # vLLM's speculative-decoding counters
        self.spec_drafts = Counter("dsv4:spec_decode_num_drafts", "Decode rows that verified "
                                   "draft tokens.", m, registry=reg)
        self.spec_draft_tokens = Counter("dsv4:spec_decode_num_draft_tokens", "Draft tokens "
                                         "verified.", m, registry=reg)
        self.spec_accepted = Counter("dsv4:spec_decode_num_accepted_tokens", "Draft tokens "
                                     "accepted.", m, registry=reg)
        self.spec_accepted_per_pos = Counter("dsv4:spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by draft position "
                                             "(0 = the first draft).", m + ["position"],
                                             registry=reg)
        self._seen: dict[str, int] = {}  # the engine's totals at the last refresh, by counter
        self.prompt_tokens_total = 0  # the same sums as the two token counters, readable
        self.generation_tokens_total = 0

    def outcome(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(self.model_name, endpoint, outcome).inc()

    async def render(self, get_stats: Callable[[], Awaitable[EngineStats]]) -> bytes:
        """Refresh the engine gauges (``AsyncLLM.get_stats``), then export."""
        stats = await read_engine_stats(get_stats)
        if stats is not None:
            name = self.model_name
            self.running.labels(name).set(stats.num_running)
            self.waiting.labels(name).set(stats.num_waiting)
            self.kv_usage.labels(name).set(stats.kv_cache_usage)
            totals = {"prefix_queries": (self.prefix_queries, (), stats.prefix_cache_queries),
                      "prefix_hits": (self.prefix_hits, (), stats.prefix_cache_hits),
                      "spec_drafts": (self.spec_drafts, (), stats.spec_num_drafts),
                      "spec_draft_tokens": (self.spec_draft_tokens, (),
                                            stats.spec_draft_tokens),
                      "spec_accepted": (self.spec_accepted, (), stats.spec_accepted_tokens)}
            for j, n in enumerate(stats.spec_accepted_per_position):
                totals[f"spec_accepted_{j}"] = (self.spec_accepted_per_pos, (str(j),), n)
            for key, (counter, labels, total) in totals.items():  # the engine keeps totals
                counter.labels(name, *labels).inc(max(0, total - self._seen.get(key, 0)))
                self._seen[key] = total
        return generate_latest(self.registry)


async def read_engine_stats(get_stats: Callable[[], Awaitable[EngineStats]],
                            timeout: float = 5.0) -> EngineStats | None:
    """The engine's stats read between steps (``AsyncLLM.get_stats``); None when the engine
    does not answer within ``timeout`` or is gone."""
    try:
        return await asyncio.wait_for(get_stats(), timeout)
    except Exception:  # noqa: BLE001 - a busy or dead engine must not break the caller
        logger.debug("engine gauges unavailable", exc_info=True)
        return None


class RequestStats:
    """Latency and token bookkeeping of one request (all its choices)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self.metrics, self.name = metrics, metrics.model_name
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.num_prompt_tokens, self.num_generation_tokens = num_prompt_tokens, 0
        metrics.prompt_tokens.labels(self.name).inc(num_prompt_tokens)
        metrics.prompt_tokens_total += num_prompt_tokens

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(self.name).observe(now - self.start)
        elif self.last is not None:
            self.metrics.itl.labels(self.name).observe((now - self.last) / num_tokens)
        self.last = now
        self.num_generation_tokens += num_tokens
        self.metrics.generation_tokens.labels(self.name).inc(num_tokens)
        self.metrics.generation_tokens_total += num_tokens

    def on_finish(self, finish_reason: str | None) -> None:
        self.metrics.finished.labels(self.name, finish_reason or "unknown").inc()

    def done(self) -> None:
        self.metrics.e2e.labels(self.name).observe(time.monotonic() - self.start)
