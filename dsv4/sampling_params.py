"""SamplingParams: how one request is sampled and when it stops (vLLM's field names and meaning).

Validated once in ``__post_init__``: a bad value raises ValueError naming the field. ``stop`` is
normalised to a list of strings, ``stop_token_ids`` to a list of ints. Stop *strings* are matched
by the detokenizer layer (the engine only sees token ids); ``validate_prompt`` checks a prompt
against the engine limits. Treat an instance as read-only once a request holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsv4.engine.engine_config import EngineConfig

__all__ = ["SamplingParams", "validate_prompt", "GREEDY_TEMPERATURE"]

GREEDY_TEMPERATURE = 1e-5  # temperature below this samples greedily (vLLM's _SAMPLING_EPS)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt (the engine fans them out as separate requests)
    temperature: float = 1.0  # 0 (or < 1e-5): greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; 0 = off
    presence_penalty: float = 0.0  # [-2, 2], subtracted once per token seen in the output
    frequency_penalty: float = 0.0  # [-2, 2], subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; divides positive / multiplies negative logits of
    # tokens seen in prompt or output (1 = off)
    seed: int | None = None  # per-request seed: same tokens whatever the batch holds
    max_tokens: int | None = 16  # output tokens at most; None: up to max_model_len
    min_tokens: int = 0  # EOS / stop_token_ids are masked and stop strings ignored before this
    stop: str | list[str] | None = None  # stop strings (matched by the detokenizer)
    stop_token_ids: list[int] | None = None  # extra token ids that end the request
    ignore_eos: bool = False  # keep going past the EOS token
    logprobs: int | None = None  # top-N logprobs per output token (0: only the sampled one)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._verify()

    def _verify(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got "
                             f"{self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got "
                             f"{self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                             f"({self.max_tokens})")
        for token_id, bias in (self.logit_bias or {}).items():
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token_id!r}")
            if not _is_number(bias):
                raise ValueError(f"logit_bias[{token_id}] must be a finite number, got {bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")
        assert isinstance(self.stop, list)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids or ()):
            raise ValueError(f"stop_token_ids must be non-negative integers, got "
                             f"{self.stop_token_ids!r}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def validate_prompt(
    prompt_token_ids: Sequence[int],
    sampling_params: SamplingParams,
    engine_config: EngineConfig,
    vocab_size: int,
) -> None:
    """Raise ValueError (naming the problem) when the prompt cannot be served as asked: empty,
    token ids outside [0, vocab_size), no room for one output token within max_model_len,
    prompt + max_tokens beyond max_model_len, stop_token_ids or logit_bias ids outside the
    vocabulary, more logprobs than the vocabulary has."""
    num_prompt = len(prompt_token_ids)
    max_model_len = engine_config.max_model_len
    if num_prompt == 0:
        raise ValueError("prompt is empty: at least one prompt token is needed")
    for i, token_id in enumerate(prompt_token_ids):
        if not _is_int(token_id) or not 0 <= token_id < vocab_size:
            raise ValueError(f"prompt token id {token_id!r} at position {i} is outside the "
                             f"vocabulary [0, {vocab_size})")
    if num_prompt >= max_model_len:
        raise ValueError(f"prompt has {num_prompt} tokens, which leaves no room for output "
                         f"within max_model_len={max_model_len}")
    max_tokens = sampling_params.max_tokens
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = "
                         f"{num_prompt + max_tokens} exceeds max_model_len={max_model_len}")
    for token_id in sampling_params.stop_token_ids or ():
        if token_id >= vocab_size:
            raise ValueError(f"stop_token_ids: {token_id} is outside the vocabulary "
                             f"[0, {vocab_size})")
    for token_id in sampling_params.logit_bias or ():
        if token_id >= vocab_size:
            raise ValueError(f"logit_bias: token id {token_id} is outside the vocabulary "
                             f"[0, {vocab_size})")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(sampling_params, name)
        if value is not None and value > vocab_size:
            raise ValueError(f"{name} {value} exceeds the vocabulary size {vocab_size}")
