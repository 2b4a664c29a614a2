"""Output processing: engine token deltas -> text deltas and vLLM-shaped results.

One place for what happens after the engine, shared by the offline ``LLM`` and the server:
``CompletionState`` detokenizes one completion incrementally, applies stop strings (a match
ends the completion; the caller tells the engine with ``finish_request``), and gathers token
ids and logprobs; ``RequestState`` holds the completions of one request (``n`` x prompts, see
``dsv4.input_processor.fan_out``) and is finished once all of them are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4.detokenizer import IncrementalDetokenizer
from dsv4.engine.outputs import EngineOutput, TokenLogprobs
from dsv4.input_processor import Choice
from dsv4.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer

__all__ = ["CompletionOutput", "CompletionState", "Delta", "RequestOutput", "RequestState"]


@dataclass
class Delta:
    """What one completion gained: new tokens and the text now safe to emit."""

    index: int  # completion (choice) index
    token_ids: list[int]
    text: str  # stop strings cut, partial UTF-8 held back
    logprobs: list[TokenLogprobs] | None = None  # one per token in token_ids, when asked
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # with the first tokens, when asked: None, then one per prompt token after the first
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # prompt tokens the prefix cache held, on the first delta that knows it
    num_cached_tokens: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # with SamplingParams(prompt_logprobs=N): None for the first prompt token, then each
    # token's logprob given the ones before it, with the top-N
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # prompt tokens computed by an earlier request and taken from the prefix cache (vLLM's
    # field; with n > 1, the first completion's)
    num_cached_tokens: int | None = None


class CompletionState:
    def __init__(self, index: int, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.output = CompletionOutput(index)
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, params)
        self.num_cached_tokens: int | None = None  # the first engine request's prefix-cache hit

    @property
    def token_ids(self) -> list[int]:
        return self.output.token_ids

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, once one has."""
        return self.detok.stopped

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    def add(self, token_ids: list[int], logprobs: list[TokenLogprobs] | None = None,
            prompt_logprobs: list[TokenLogprobs | None] | None = None,
            num_cached_tokens: int | None = None) -> Delta:
        """Tokens that continue the completion (sampled or forced). The first known
        ``num_cached_tokens`` is kept: later engine requests of one completion (the server's
        phases) continue its own tokens, which are not the client's prompt."""
        if self.num_cached_tokens is None:
            self.num_cached_tokens = num_cached_tokens
        out = self.output
        if len(token_ids) > 1 and self.detok.params.stop:  # several tokens in one step
            # (speculative decoding): nothing after the token that completes a stop string
            text = ""
            for n, token_id in enumerate(token_ids, 1):
                text += self.detok.add([token_id])
                if self.detok.stopped is not None:
                    token_ids = token_ids[:n]
                    logprobs = logprobs[:n] if logprobs is not None else None
                    break
        else:
            text = self.detok.add(token_ids)
        out.token_ids.extend(token_ids)
        if logprobs is not None:
            out.logprobs = (out.logprobs or []) + list(logprobs)
        out.text += text
        return Delta(out.index, token_ids, text, logprobs, prompt_logprobs=prompt_logprobs,
                     num_cached_tokens=self.num_cached_tokens)

    def finish(self, finish_reason: str | None, stop_reason: int | str | None = None) -> Delta:
        """End the completion; a matched stop string overrides the reason. Returns the last
        delta (the held-back tail of the text)."""
        out = self.output
        if self.detok.stopped is not None:
            finish_reason, stop_reason = "stop", self.detok.stopped
        tail = self.detok.add([], final=True)
        out.text += tail
        out.finish_reason, out.stop_reason = finish_reason or "stop", stop_reason
        return Delta(out.index, [], tail, None, True, out.finish_reason, stop_reason)

    def process(self, engine_output: EngineOutput) -> Delta:
        """Apply one engine output; the delta is finished when the engine finished the
        completion or a stop string matched (then the caller must finish the engine
        request)."""
        o = engine_output
        delta = self.add(o.new_token_ids, o.logprobs, o.prompt_logprobs, o.num_cached_tokens)
        if o.finished or self.stopped is not None:
            last = self.finish(o.finish_reason, o.stop_reason)
            delta.text += last.text
            delta.finished, delta.finish_reason = True, last.finish_reason
            delta.stop_reason = last.stop_reason
        return delta


class RequestState:
    """The completions of one request; finished once every one of them is."""

    def __init__(self, request_id: str, tokenizer: Tokenizer, choices: list[Choice],
                 prompts: list[list[int]], texts: list[str | None] | None = None) -> None:
        self.request_id, self.choices, self.prompts = request_id, choices, prompts
        self.texts = texts or [None] * len(prompts)
        self.completions = [CompletionState(c.index, tokenizer, c.params) for c in choices]
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def process(self, index: int, engine_output: EngineOutput) -> Delta | None:
        """Apply an engine output of completion ``index``; None once that one has ended."""
        completion = self.completions[index]
        if completion.finished:
            return None  # e.g. the engine's own final output after a stop string
        if engine_output.prompt_logprobs is not None:
            self.prompt_logprobs = engine_output.prompt_logprobs
        return completion.process(engine_output)

    def output(self) -> RequestOutput:
        """The vLLM-shaped result of a one-prompt request."""
        assert len(self.prompts) == 1, "RequestOutput covers one prompt"
        return RequestOutput(self.request_id, self.texts[0], self.prompts[0],
                             [c.output for c in self.completions], self.finished,
                             self.prompt_logprobs, self.completions[0].num_cached_tokens)
