"""LLM: the offline API in vLLM's shape, over LLMEngine.

    llm = LLM()                                   # the embedded demo model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
    outs[0].outputs[0].text, .token_ids, .logprobs, .finish_reason
    outs = llm.chat([{"role": "user", "content": "Hi"}], chat_template_kwargs={"thinking": False})

Text in, text out, through the same input and output processing as the server
(``dsv4.input_processor``, ``dsv4.output_processor``): prompts are tokenized and validated, ``n``
fans out into one engine request per completion, outputs are detokenized incrementally and stop
strings end a completion as soon as they appear. The engine below only sees token ids.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dsv4.engine_args import EngineArgs
from dsv4.errors import InvalidRequestError
from dsv4.input_processor import InputProcessor, fan_out
from dsv4.output_processor import CompletionOutput, RequestOutput, RequestState
from dsv4.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput", "CompletionOutput"]

Prompt = str | dict[str, Any]  # text, {"prompt": text} or {"prompt_token_ids": [...]} (vLLM)


class LLM:
    def __init__(self, model: str | Path | None = None, *, progress: bool = False,
                 **engine_args: Any) -> None:
        """``engine_args`` are ``dsv4.EngineArgs`` fields (device, dtype, emulate_quant,
        max_model_len, max_num_seqs, kv_cache_memory, ...); an unknown one is a TypeError."""
        self._init(EngineArgs(model=model, **engine_args), progress)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *, progress: bool = False) -> LLM:
        llm = cls.__new__(cls)
        llm._init(args, progress)
        return llm

    def _init(self, args: EngineArgs, progress: bool) -> None:
        path = args.model_path()
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.engine = args.create_engine(progress=progress,
                                         eos_token_id=self.tokenizer.eos_token_id)
        self.engine.enable_structured_outputs(self.tokenizer)
        self.processor = InputProcessor(self.tokenizer, self.engine.config.max_model_len,
                                        self.engine.model_config.vocab_size)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt, results in input order. A prompt is text, or as in vLLM
        a dict with "prompt" (text) or "prompt_token_ids"; `prompt_token_ids=` takes id lists."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
            pairs = [self._prompt(i, item) for i, item in enumerate(items)]
        else:
            pairs = [(None, list(ids)) for ids in prompt_token_ids]
        params = sampling_params or SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(pairs)
        if len(param_list) != len(pairs):
            raise ValueError("sampling_params list must have one entry per prompt")
        states: list[RequestState] = []
        owner: dict[str, tuple[RequestState, int]] = {}  # engine request -> (state, index)
        try:
            for (text, ids), p in zip(pairs, param_list, strict=True):
                self.processor.validate(ids, p)
                rid = str(next(self._ids))
                choices = fan_out(rid, p)
                state = RequestState(rid, self.tokenizer, choices, [ids], [text])
                states.append(state)
                for choice in choices:
                    self.engine.add_request(choice.request_id, ids, choice.params)
                    owner[choice.request_id] = (state, choice.index)
        except ValueError:
            for child in owner:
                self.engine.abort_request(child)
            raise
        bar = tqdm(total=len(states), desc="Generating", disable=not use_tqdm)
        open_states = set(range(len(states)))
        while open_states:
            for out in self.engine.step():
                state, index = owner[out.request_id]
                delta = state.process(index, out)
                if delta is not None and delta.finished and not out.finished:
                    self.engine.finish_request(out.request_id, delta.stop_reason)
            for k in [k for k in open_states if states[k].finished]:
                open_states.discard(k)
                bar.update(1)
        bar.close()
        return [state.output() for state in states]

    def _prompt(self, i: int, item: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(item, str):
            return item, self.processor.tokenize(item)
        if isinstance(item, dict):
            unknown = set(item) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise InvalidRequestError(f"prompts[{i}]: unsupported key(s) {sorted(unknown)}",
                                          param="prompts")
            if isinstance(item.get("prompt_token_ids"), (list, tuple)):
                return item.get("prompt"), list(item["prompt_token_ids"])
            if isinstance(item.get("prompt"), str):
                return item["prompt"], self.processor.tokenize(item["prompt"])
        raise InvalidRequestError(f"prompts[{i}] must be text, {{'prompt': text}} or "
                                  f"{{'prompt_token_ids': [...]}}, got {type(item).__name__}",
                                  param="prompts")

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
        reasoning_content, content and tool_calls. Bad messages raise InvalidRequestError."""
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of messages or "
                                      "conversations", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = []
        for i, conversation in enumerate(conversations):
            if not isinstance(conversation, list):
                raise InvalidRequestError(f"messages: conversation {i} must be a list of "
                                          "message objects", param="messages")
            prompts.append(self.processor.render_chat({
                "messages": conversation, "tools": tools,
                "chat_template_kwargs": chat_template_kwargs,
                "reasoning_effort": reasoning_effort}))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
