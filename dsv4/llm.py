"""LLM: the offline API in vLLM's shape, over LLMEngine.

    llm = LLM()                                   # the embedded demo model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
    outs[0].outputs[0].text, .token_ids, .logprobs, .finish_reason
    outs = llm.chat([{"role": "user", "content": "Hi"}], chat_template_kwargs={"thinking": False})

Text in, text out: prompts are tokenized here and outputs detokenized incrementally (stop
strings end a completion as soon as they appear). The engine below only sees token ids.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv4.detokenizer import IncrementalDetokenizer
from dsv4.encoding import encode_messages
from dsv4.encoding_request import encoder_args_from_request
from dsv4.engine.llm_engine import LLMEngine, TokenLogprobs
from dsv4.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput", "CompletionOutput"]

Prompt = str | dict[str, Any]  # text, {"prompt": text} or {"prompt_token_ids": [...]} (vLLM)


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


class LLM:
    def __init__(self, model: str | Path | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, emulate_quant: bool = True,
                 progress: bool = False, **engine_args: Any) -> None:
        if model is None:
            from dsv4.demo import default_model_path

            model = default_model_path()
        self.engine = LLMEngine.from_pretrained(model, device=device, dtype=dtype,
                                                emulate_quant=emulate_quant, progress=progress,
                                                **engine_args)
        self.tokenizer = Tokenizer.from_pretrained(model)
        self.engine.eos_token_id = self.tokenizer.eos_token_id
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt, results in input order. A prompt is text, or as in vLLM
        a dict with "prompt" (text) or "prompt_token_ids"; `prompt_token_ids=` takes id lists."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        texts: list[str | None]
        if prompts is not None:
            items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
            texts, id_lists = [], []
            for i, item in enumerate(items):
                text, ids = self._prompt(i, item)
                texts.append(text)
                id_lists.append(ids)
        else:
            id_lists = [list(ids) for ids in prompt_token_ids]
            texts = [None] * len(id_lists)
        params = sampling_params or SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(id_lists)
        if len(param_list) != len(id_lists):
            raise ValueError("sampling_params list must have one entry per prompt")
        results: dict[str, RequestOutput] = {}
        detoks: dict[tuple[str, int], IncrementalDetokenizer] = {}
        try:
            for text, ids, p in zip(texts, id_lists, param_list, strict=True):
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p)
                results[rid] = RequestOutput(rid, text, ids,
                                             [CompletionOutput(i) for i in range(p.n)])
                for i in range(p.n):
                    detoks[(rid, i)] = IncrementalDetokenizer(self.tokenizer, p)
        except ValueError:
            for rid in results:
                self.engine.abort_request(rid)
            raise
        bar = tqdm(total=len(results), desc="Generating", disable=not use_tqdm)
        open_count = {rid: len(r.outputs) for rid, r in results.items()}  # unfinished completions
        while open_count:
            for out in self.engine.step():
                if out.request_id not in open_count:
                    continue
                comp = results[out.request_id].outputs[out.index]
                if out.prompt_logprobs is not None:
                    results[out.request_id].prompt_logprobs = out.prompt_logprobs
                if comp.finish_reason is not None:
                    continue  # already ended by a stop string
                comp.token_ids.extend(out.new_token_ids)
                if out.logprobs is not None:
                    comp.logprobs = comp.logprobs or []
                    comp.logprobs.extend(out.logprobs)
                detok = detoks[(out.request_id, out.index)]
                comp.text += detok.add(out.new_token_ids, final=out.finished)
                finished, reason, stop = out.finished, out.finish_reason, out.stop_reason
                if detok.stopped is not None and not finished:
                    self.engine.finish_request(out.request_id, out.index, detok.stopped)
                    finished, reason, stop = True, "stop", detok.stopped
                if finished:
                    comp.finish_reason, comp.stop_reason = reason, stop
                    open_count[out.request_id] -= 1
                    if not open_count[out.request_id]:
                        del open_count[out.request_id]
                        results[out.request_id].finished = True
                        bar.update(1)
        bar.close()
        return list(results.values())

    def _prompt(self, i: int, item: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(item, str):
            return item, self.tokenizer.encode(item)
        if isinstance(item, dict):
            unknown = set(item) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise ValueError(f"prompts[{i}]: unsupported key(s) {sorted(unknown)}")
            if isinstance(item.get("prompt_token_ids"), (list, tuple)):
                return item.get("prompt"), list(item["prompt_token_ids"])
            if isinstance(item.get("prompt"), str):
                return item["prompt"], self.tokenizer.encode(item["prompt"])
        raise ValueError(f"prompts[{i}] must be text, {{'prompt': text}} or "
                         f"{{'prompt_token_ids': [...]}}, got {type(item).__name__}")

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Chat in vLLM's shape: one conversation (a list of OpenAI-style messages) or a list of
        conversations, each rendered with the official V4 encoding exactly as the server
        renders a request with these fields (thinking on unless chat_template_kwargs or
        reasoning_effort turn it off, as DeepSeek's API). Outputs hold the raw completion
        text; `dsv4.encoding_parse.parse_message_from_completion_text` splits it into
        reasoning_content, content and tool_calls. Bad messages raise ValueError."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = []
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list) or not all(
                    isinstance(m, dict) for m in conversation):
                raise ValueError(f"messages: conversation {i} must be a list of message objects")
            request = {"messages": conversation, "tools": tools,
                       "chat_template_kwargs": chat_template_kwargs,
                       "reasoning_effort": reasoning_effort}
            try:
                prompts.append(encode_messages(**encoder_args_from_request(request)))
            except (TypeError, AttributeError, KeyError) as exc:
                raise ValueError(f"messages: {exc}") from exc
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
