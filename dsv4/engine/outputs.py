"""What the engine hands out: typed outputs and errors, its whole public surface above it.

The offline ``LLM``, ``AsyncLLM`` and the server read engine results only through these types
(token ids and numbers, never text): ``EngineOutput`` per request per step, ``TokenLogprobs``
per token, ``EngineStats`` for gauges and log lines, ``StepError`` when a step failed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOutput", "EngineStats", "StepError", "TokenLogprobs", "WorkerDiedError"]


@dataclass
class TokenLogprobs:
    token_id: int  # the sampled (or scored) token
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # the request's top-N (token id, logprob), most likely first


@dataclass
class EngineOutput:
    request_id: str  # the id given to add_request
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked
    # with the first token, when asked: None for the first prompt token, then one per token
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # prompt tokens whose cache came from the prefix cache (vLLM's num_cached_tokens); set
    # once the request was scheduled, None before (and for an abort before that)
    num_cached_tokens: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, taken between steps."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of the fullest block pool in use (1 = full)
    num_used_blocks: int  # blocks held by requests, all kinds (0 when idle)
    num_preemptions: int  # since start
    prompt_tokens: int  # prompt tokens computed since start (recomputation included)
    generation_tokens: int  # tokens sampled since start
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache since start
    prefix_cache_hits: int = 0  # of those, tokens found cached
    # speculative decoding since start: rows that verified drafts, drafts verified, drafts
    # accepted, and accepted drafts by draft position (1st, 2nd, ...)
    spec_num_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()


class WorkerDiedError(RuntimeError):
    """A rank of a multi-process engine died or stopped answering: the engine cannot go on;
    every request fails with this error, and /health answers 503."""


class StepError(RuntimeError):
    """A step failed; its requests (``request_ids``) were aborted, the engine is usable."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
