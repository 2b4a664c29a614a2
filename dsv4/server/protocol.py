"""OpenAI-compatible request/response models (the subset dsv4 serves) and request parsing.

Requests forbid unknown fields: a typo or an unsupported OpenAI field is a 400 naming it, never
silently dropped. ``IGNORED_FIELDS`` are accepted and have no effect (as in DeepSeek's API);
``reject_unsupported`` turns fields that would change the output in ways dsv4 cannot honour into
400s. Raw JSON that the prompt encoder renders (``messages``, ``tools``) stays plain dicts so it
is never re-serialized through a model class. Responses are dumped with ``exclude_none``.
``APIError`` / ``error_body`` (OpenAI's error shape) live in ``dsv4.server.errors`` and are
re-exported here.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsv4.server.errors import APIError, error_body
from dsv4.server.validation import check_json, param_path

__all__ = [
    "IGNORED_FIELDS", "APIError", "ChatCompletionRequest", "CompletionRequest",
    "DetokenizeRequest", "TokenizeRequest", "error_body", "parse_request", "reject_unsupported",
]


def parse_request(raw: bytes, model: type[BaseModel]) -> tuple[BaseModel, dict[str, Any]]:
    """JSON bytes -> (validated model, the raw dict). Any problem is a 400 naming the field,
    lone surrogates and too deep nesting included (``dsv4.server.validation.check_json``)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    check_json(data)
    try:
        return model.model_validate(data), data
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def _validation_error(exc: ValidationError) -> APIError:
    """pydantic's error as a 400 naming the field. For a union field pydantic reports each
    member it tried: the deepest error is the most specific; if none went deeper than the
    members themselves, the value's type matched none of them and they are listed."""
    errors = exc.errors()
    if errors[0]["type"] == "extra_forbidden":
        param = param_path(errors[0]["loc"])
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    err = max(errors, key=lambda e: len(e["loc"]))
    tags = [str(e["loc"][-1]) for e in errors if _is_union_tag(e["loc"][-1])]
    param = param_path([p for p in err["loc"] if not _is_union_tag(p)])
    if len(tags) > 1 and len(tags) == len(errors):
        return APIError(400, f"{param}: expected one of {', '.join(tags)}; got "
                        f"{type(err['input']).__name__}", param=param)
    message = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param)


def _is_union_tag(part: str | int) -> bool:
    """A union member pydantic names in an error location (``str``, ``list[str]``), not a key."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or "[" in part)


# ---- requests -------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted (vLLM field); usage only at the end


# Accepted with no effect, as DeepSeek's API does (documented in the README field table).
IGNORED_FIELDS = ("user", "user_id", "metadata", "store", "service_tier", "parallel_tool_calls",
                  "prompt_cache_key", "safety_identifier")


class _SamplingFields(_Strict):
    model: str | None = None  # None: the served model
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    cache_salt: str | None = None  # vLLM: requests share cached prefixes only with equal salts
    # output constraints (dsv4.server.structured): OpenAI's and vLLM's spelling
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # accepted, no effect
    user: str | None = None
    user_id: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted, no effect
    thinking: dict[str, Any] | bool | str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None  # Responses-API style {"effort": ...}
    task: str | None = None  # DeepSeek quick instruction, attached to the last user message
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # rejected when set (see reject_unsupported)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[Any]  # text, token ids, or a list of either (checked by the endpoint)
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions
    logprobs: int | None = None
    echo: bool = False
    skip_special_tokens: bool = True
    suffix: str | None = None  # rejected (V4 FIM layout is undocumented)
    best_of: int | None = None  # only == n


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    thinking: dict[str, Any] | bool | str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    task: str | None = None
    add_special_tokens: bool = False  # accepted; the V4 tokenizer adds none
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def reject_unsupported(req: BaseModel) -> None:
    """400 for fields dsv4 cannot honour (set to anything but their neutral value) and for
    logit_bias entries that are not a token id and a bias in [-100, 100]."""
    for key, bias in (getattr(req, "logit_bias", None) or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                           param="logit_bias")
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {bias!r} for "
                           f"token {key}", param="logit_bias")
    if isinstance(req, ChatCompletionRequest):
        for name in ("functions", "function_call"):
            if getattr(req, name) is not None:
                raise APIError(400, f"{name} (legacy) is not supported; use tools / tool_choice",
                               param=name)
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(req, name) is not None:
                raise APIError(400, f"{name} is not supported", param=name)
        if req.modalities is not None and list(req.modalities) != ["text"]:
            raise APIError(400, "only the 'text' modality is supported", param="modalities")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be in [0, 20]", param="top_logprobs")
    if isinstance(req, CompletionRequest):
        if req.suffix is not None:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, "logprobs must be in [0, 20]", param="logprobs")


# ---- responses ------------------------------------------------------------------------------

class _Out(BaseModel):
    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PromptTokensDetails(_Out):
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_cache_hit_tokens: int = 0  # DeepSeek API names
    prompt_cache_miss_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int,
           reasoning_tokens: int | None = None, cached_tokens: int = 0) -> Usage:
        details = None if reasoning_tokens is None else CompletionTokensDetails(
            reasoning_tokens=reasoning_tokens)
        cached = min(cached_tokens, prompt_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                   completion_tokens_details=details, prompt_cache_hit_tokens=cached,
                   prompt_cache_miss_tokens=prompt_tokens - cached)


class FunctionCall(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] = Field(default_factory=list)


class ChatMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None

    def dump(self) -> dict[str, Any]:
        out = super().dump()
        for choice in out["choices"]:  # explicit nulls, as OpenAI and DeepSeek send them
            choice["message"].setdefault("content", None)
            choice["message"].setdefault("reasoning_content", None)
        return out


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    # None for the first prompt token when echo shows the prompt's logprobs
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
