"""Request: the life of one generation request inside the engine (CPU only).

A request has no prefill/decode flag (vLLM v1): the scheduler advances ``num_computed_tokens``
toward ``num_tokens`` (prompt + output); when they meet, the next token is sampled. Preemption
resets ``num_computed_tokens`` to 0 and the request recomputes prompt + output so far. The
request never sees text: stop strings live in the detokenizer, which ends a request through
``Scheduler.finish_requests``. ``StepOutput`` is what one step reports for one request (the offline API turns these into
vLLM-shaped ``dsv4.RequestOutput`` objects).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsv4.sampling_params import SamplingParams

__all__ = ["Request", "StepOutput", "RequestStatus"]


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()  # queued, holds no blocks
    RUNNING = enum.auto()  # holds blocks and a state slot
    PREEMPTED = enum.auto()  # lost its blocks; waits (at the front) to recompute
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()  # client gone or aborted by the engine

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI ``finish_reason``: "stop" | "length" | "abort"; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One request: token ids, progress and status. Mutated only by the Scheduler."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.output_token_ids: list[int] = []
        # prompt + output in one list, so scheduling a slice never concatenates
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or scheduled into it)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string hit
        self.num_preemptions = 0
        # prefix caching: hashes of the full blocks of all_token_ids so far (extended by the
        # scheduler), prompt tokens found cached when first scheduled (None until then), and
        # the swa block whose CSA boundary state the next step must load (0: none)
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens: int | None = None
        self.boundary_block = 0
        # speculative decoding: the draft tokens proposed for the next step (verified there)
        self.spec_token_ids: list[int] = []

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    # ---- mutation (Scheduler only) -----------------------------------------------------------
    def append_output_token_ids(self, token_ids: int | Sequence[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status implied by the last output token, or None to keep going.
        EOS (unless ignore_eos) and stop_token_ids give FINISHED_STOPPED, from min_tokens on;
        max_tokens or max_model_len give FINISHED_LENGTH."""
        if not self.output_token_ids:
            return None
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens < params.min_tokens:
            # the sampler masks EOS and stop ids until then; forced tokens do not stop either
            return RequestStatus.FINISHED_LENGTH if self.num_tokens >= max_model_len else None
        if not params.ignore_eos and last == self.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and last in params.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}"
                f", output={self.num_output_tokens}, computed={self.num_computed_tokens})")


@dataclass
class StepOutput:
    """What one step produced for one request (the engine turns it into API responses)."""

    request_id: str
    new_token_ids: list[int]  # tokens appended this step (may be empty for a finish/abort)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # stop token id / stop string that ended it
    logprobs: Any = None  # whatever the runner returned for these tokens (opaque here)
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache
