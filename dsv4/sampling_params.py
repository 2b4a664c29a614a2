"""SamplingParams: how one request is sampled and when it stops (vLLM's field names and meaning).

Validated once in ``__post_init__``: a bad value raises ``InvalidRequestError`` (a ValueError)
whose ``param`` names the field. ``stop`` is
normalised to a list of strings, ``stop_token_ids`` to a list of ints. Stop *strings* are matched
by the detokenizer layer (the engine only sees token ids); ``validate_prompt`` checks a prompt
against the engine limits. Treat an instance as read-only once a request holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dsv4.errors import InvalidRequestError
from dsv4.structured_outputs import StructuredOutputsParams

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
    # prefix caching: only requests with the same salt share cached blocks (vLLM's cache_salt,
    # which it takes in the request body; here it travels with the params), so one tenant
    # cannot time another's prompts through cache hits. None: the shared cache
    cache_salt: str | None = None
    # constrain the output (after the reasoning, when the prompt opens one) to a JSON schema,
    # regex, choice or grammar; see dsv4.structured_outputs
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._verify()

    def _verify(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message, param=param)

        check(_is_int(self.n) and self.n >= 1, "n", f"n must be an integer >= 1, got {self.n!r}")
        check(_is_number(self.temperature) and self.temperature >= 0, "temperature",
              f"temperature must be a finite number >= 0, got {self.temperature!r}")
        check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(_is_int(self.top_k) and self.top_k >= -1, "top_k",
              f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p",
              f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_is_number(value) and -2.0 <= value <= 2.0, name,
                  f"{name} must be in [-2, 2], got {value!r}")
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
              "repetition_penalty", f"repetition_penalty must be > 0, got "
              f"{self.repetition_penalty!r}")
        check(self.seed is None or _is_int(self.seed), "seed",
              f"seed must be an integer or None, got {self.seed!r}")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", f"max_tokens must be an integer >= 1 or None, got "
              f"{self.max_tokens!r}")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for token_id, bias in (self.logit_bias or {}).items():
            check(_is_int(token_id) and token_id >= 0, "logit_bias",
                  f"logit_bias keys must be token ids >= 0, got {token_id!r}")
            check(_is_number(bias), "logit_bias",
                  f"logit_bias[{token_id}] must be a finite number, got {bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and value >= 0), name,
                  f"{name} must be an integer >= 0 or None, got {value!r}")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
              "cache_salt", f"cache_salt must be a non-empty string, got {self.cache_salt!r}")
        assert isinstance(self.stop, list)
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              f"stop must be non-empty strings, got {self.stop!r}")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids or ()), "stop_token_ids",
              f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.structured_outputs is not None:
            check(isinstance(self.structured_outputs, StructuredOutputsParams),
                  "structured_outputs", "structured_outputs must be a StructuredOutputsParams")
            # a finished grammar allows only EOS: both would leave no token to sample
            check(not self.ignore_eos, "ignore_eos",
                  "ignore_eos cannot be combined with structured outputs")
            check(self.min_tokens == 0, "min_tokens",
                  "min_tokens cannot be combined with structured outputs")

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
    max_model_len: int,
    vocab_size: int,
) -> None:
    """Raise InvalidRequestError (naming the parameter) when the prompt cannot be served as
    asked: empty, token ids outside [0, vocab_size), no room for one output token within
    max_model_len, prompt + max_tokens beyond max_model_len, stop_token_ids or logit_bias ids
    outside the vocabulary, more logprobs than the vocabulary has."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise InvalidRequestError("prompt is empty: at least one prompt token is needed",
                                  param="prompt")
    # C-speed checks first (a prompt may be 1M ids, checked by the processor and the engine);
    # the Python loop only runs to name the culprit
    if (set(map(type, prompt_token_ids)) != {int} or min(prompt_token_ids) < 0
            or max(prompt_token_ids) >= vocab_size):
        for i, token_id in enumerate(prompt_token_ids):
            if not _is_int(token_id) or not 0 <= token_id < vocab_size:
                raise InvalidRequestError(f"prompt token id {token_id!r} at position {i} is "
                                          f"outside the vocabulary [0, {vocab_size})",
                                          param="prompt")
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt} tokens, which leaves no room for output", param="prompt",
            code="context_length_exceeded")
    max_tokens = sampling_params.max_tokens
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens; the prompt "
            f"({num_prompt} tokens) + max_tokens ({max_tokens}) = {num_prompt + max_tokens} "
            "exceeds it. Reduce the length of the prompt or of the completion.",
            param="max_tokens", code="context_length_exceeded")
    for name in ("stop_token_ids", "logit_bias"):
        for token_id in getattr(sampling_params, name) or ():
            if token_id >= vocab_size:
                raise InvalidRequestError(f"{name}: token id {token_id} is outside the "
                                          f"vocabulary [0, {vocab_size})", param=name)
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(sampling_params, name)
        if value is not None and value > vocab_size:
            raise InvalidRequestError(f"{name} {value} exceeds the vocabulary size {vocab_size}",
                                      param=name)
