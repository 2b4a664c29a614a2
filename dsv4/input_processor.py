"""InputProcessor: text in, validated engine requests out (vLLM v1's input-processing step).

One place for what happens before the engine, shared by the offline ``LLM`` and the server:
tokenize a prompt, render a chat request with the official V4 encoding, validate a prompt
against the engine's limits, and turn ``n`` (and several prompts) into one engine request per
completion (``fan_out``). Every error is an ``InvalidRequestError`` naming the parameter. The
work is synchronous and may be slow for long inputs: the server runs it in a worker thread
(tokenization releases the GIL), so it never stalls the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsv4.encoding import encode_messages
from dsv4.encoding_effort import PROFILE_PREVIEW
from dsv4.encoding_request import encoder_args_from_request
from dsv4.errors import InvalidRequestError
from dsv4.sampling_params import SamplingParams, validate_prompt
from dsv4.tokenizer import Tokenizer

__all__ = ["Choice", "InputProcessor", "fan_out"]


@dataclass(frozen=True)
class Choice:
    """One completion of a request: its engine request id, prompt and params."""

    index: int  # choice index in the response (prompt p, sample j: p * n + j)
    request_id: str
    prompt_index: int
    params: SamplingParams  # n=1; seed + j when the request has a seed


def fan_out(request_id: str, params: SamplingParams, num_prompts: int = 1) -> list[Choice]:
    """The ``num_prompts x n`` completions of one request, each its own engine request
    (``{request_id}-{index}``, or ``request_id`` itself when there is one); sample j of a
    seeded request uses ``seed + j``, so every completion is reproducible on its own."""
    total = num_prompts * params.n
    choices = []
    for index in range(total):
        j = index % params.n
        seed = None if params.seed is None else params.seed + j
        child = dataclasses.replace(params, n=1, seed=seed) if params.n > 1 else params
        rid = request_id if total == 1 else f"{request_id}-{index}"
        choices.append(Choice(index, rid, index // params.n, child))
    return choices


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 effort_profile: str = PROFILE_PREVIEW) -> None:
        self.tokenizer = tokenizer
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.effort_profile = effort_profile

    def tokenize(self, text: str, param: str = "prompt") -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"{param} must be a string, got {type(text).__name__}",
                                      param=param)
        try:
            return self.tokenizer.encode(text)
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate, which is valid JSON
            raise InvalidRequestError(f"{param} is not valid text: {exc}", param=param) from exc

    def render_chat(self, request: Mapping[str, Any], default_thinking: bool = True) -> str:
        """The prompt string of an OpenAI-style chat request body (messages, tools, thinking
        and effort fields), byte-identical to the official encoding; ``default_thinking`` is
        the mode of a request that names none."""
        messages = request.get("messages")
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of message objects",
                                      param="messages")
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise InvalidRequestError(f"messages[{i}] must be a message object",
                                          param=f"messages[{i}]")
        args = encoder_args_from_request(request, effort_profile=self.effort_profile,
                                         default_thinking=default_thinking)
        try:
            return encode_messages(**args)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(f"messages: {exc}", param="messages") from exc

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                 prompt_param: str = "prompt") -> None:
        """What the engine will check on admission, checked here first so a bad request fails
        before any work (``prompt_param`` names the prompt field: "prompt" or "messages")."""
        try:
            validate_prompt(prompt_token_ids, params, self.max_model_len, self.vocab_size)
        except InvalidRequestError as exc:
            if exc.param == "prompt" and prompt_param != "prompt":
                exc.param = prompt_param
            raise
