"""LLMEngine: the step loop. Owns the scheduler (CPU) and the model runner (tensors).

`add_request` validates and queues (n > 1 fans out into child requests), `step()` schedules one
batch, runs it and returns one EngineOutput per request that advanced, `abort_request` ends a
request at any time. Token ids only: text, stop strings and chat templates live above it (the
offline LLM and the server). Not thread-safe: one thread drives it (see dsv4.async_llm).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.spec import kv_bytes_per_seq, kv_bytes_per_token, state_bytes_per_seq
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.model_runner import ModelRunner
from dsv4.engine.request import Request, RequestStatus
from dsv4.engine.sampler import LogprobsTensors, SamplerOutput
from dsv4.engine.scheduler import Scheduler
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.model.loader import load_model
from dsv4.sampling_params import SamplingParams, validate_prompt

__all__ = ["LLMEngine", "EngineOutput", "TokenLogprobs", "StepError", "default_kv_cache_memory"]

logger = logging.getLogger(__name__)

_PLAIN_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}


class StepError(RuntimeError):
    """A step failed; its requests (`request_ids`) were aborted, the engine is usable."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


@dataclass
class TokenLogprobs:
    token_id: int  # the sampled token
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # the request's top-N (token id, logprob), most likely first


@dataclass
class EngineOutput:
    request_id: str  # the id given to add_request
    index: int  # which of the n completions
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked
    # with the first token, when asked: None for the first prompt token, then one per token
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def _token_logprobs(t: LogprobsTensors, rows: slice, n: int) -> list[TokenLogprobs]:
    """Rows of sampler-layout logprobs (column 0 the chosen token, then the top ones) with the
    top-n each."""
    ids, lps = t.token_ids[rows].tolist(), t.logprobs[rows].tolist()
    ranks = t.sampled_token_ranks[rows].tolist()
    return [TokenLogprobs(i[0], lp[0], r, list(zip(i[1:n + 1], lp[1:n + 1])))
            for i, lp, r in zip(ids, lps, ranks)]


def default_kv_cache_memory(device: torch.device, fraction: float = 0.2) -> int:
    """A share of the memory that is free now (CUDA: device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return 2 << 30


class LLMEngine:
    def __init__(self, model: DeepseekV4ForCausalLM, engine_config: EngineConfig,
                 eos_token_id: int | None = None) -> None:
        self.model, self.config = model, engine_config
        self.model_config = model.config
        self.eos_token_id = model.config.eos_token_id if eos_token_id is None else eos_token_id
        self.block_manager = BlockManager.from_config(model.config, engine_config)
        self.scheduler = Scheduler(engine_config, self.block_manager)
        self.runner = ModelRunner(model, self.block_manager, engine_config.kv_cache_dtype,
                                  engine_config.index_cache_dtype,
                                  engine_config.compressor_state_dtype)
        info = self.cache_info()
        logger.info("KV cache: %.2f GiB (%s entries, %s indexer keys), %.1f B/token, "
                    "%.2f GiB per %d-token sequence, %d state slots",
                    info["memory_bytes"] / 2**30, engine_config.kv_cache_dtype,
                    engine_config.index_cache_dtype or "default", info["bytes_per_token"],
                    info["bytes_per_max_sequence"] / 2**30, engine_config.max_model_len,
                    info["num_state_slots"])
        self._children: dict[str, tuple[str, int]] = {}  # child request id -> (id, index)
        self._parents: dict[str, list[str]] = {}
        self._child_params: dict[str, SamplingParams] = {}
        # prompt logprobs being collected, until they go out with the first token
        self._prompt_lps: dict[str, list[TokenLogprobs]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, emulate_quant: bool = True,
                        progress: bool = True, **engine_args: Any) -> LLMEngine:
        model = load_model(path, device=device, dtype=dtype, emulate_quant=emulate_quant,
                           progress=progress)
        return cls(model, make_engine_config(model, **engine_args))

    def cache_info(self) -> dict[str, float]:
        """KV-cache figures of this engine: allocated bytes, asymptotic bytes per token, bytes of
        one max_model_len sequence (entries + window + compressor state), state slots."""
        specs = self.block_manager.specs
        n = self.config.max_model_len
        return {"memory_bytes": self.runner.kv_cache.memory_bytes(),
                "bytes_per_token": kv_bytes_per_token(specs),
                "bytes_per_max_sequence": kv_bytes_per_seq(specs, n) + state_bytes_per_seq(specs),
                "num_state_slots": self.block_manager.num_state_slots}

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue a request; raises ValueError naming the problem (nothing is queued then)."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        validate_prompt(prompt_token_ids, params, self.config, self.model_config.vocab_size)
        children = []
        for i in range(params.n):
            child = request_id if params.n == 1 else f"{request_id}#{i}"
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + i
                child_params = dataclasses.replace(params, n=1, seed=seed)
            self.scheduler.add_request(Request(child, prompt_token_ids, child_params,
                                               eos_token_id=self.eos_token_id))
            self._children[child] = (request_id, i)
            self._child_params[child] = child_params
            if params.prompt_logprobs is not None:
                self._prompt_lps[child] = []
            children.append(child)
        self._parents[request_id] = children

    def abort_request(self, request_id: str) -> list[EngineOutput]:
        """End a request (all its completions) now; its blocks are free on return."""
        children = self._parents.get(request_id, [])
        return self._convert(self.scheduler.abort_requests(children), None, None)

    def finish_request(self, request_id: str, index: int, stop_reason: str) -> list[EngineOutput]:
        """End one completion because the text layer matched a stop string; returns its final
        (empty, finished) output so streaming consumers see the end."""
        children = self._parents.get(request_id)
        if children is None or index >= len(children):
            return []
        done = self.scheduler.finish_requests([children[index]], RequestStatus.FINISHED_STOPPED,
                                              stop_reason)
        return self._convert(done, None, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        try:
            sampled, out, prompt_lps = self.runner.execute(batch)
        except Exception as exc:
            # fail this step's requests only; everything else keeps going next step
            parents = sorted({self._children[r][0] for r in batch.req_ids if r in self._children})
            for parent in parents:
                self.abort_request(parent)
            raise StepError(parents, exc) from exc
        for child, (start, t) in prompt_lps.items():
            self._collect_prompt_logprobs(child, start, t)
        step_outputs = self.scheduler.update_from_output(batch, sampled)
        return self._convert(step_outputs, batch.req_ids, out, batch.sample_indices)

    def _collect_prompt_logprobs(self, child: str, start: int, t: LogprobsTensors) -> None:
        """Keep the prompt logprobs of positions start.. not collected before (a request that
        was preempted recomputes its prompt; its first pass already counted, and once the
        first token went out there is nothing left to collect)."""
        have = self._prompt_lps.get(child)
        if have is None:
            return
        skip = len(have) - start  # rows already collected
        if 0 <= skip < t.token_ids.shape[0]:
            have.extend(_token_logprobs(t, slice(skip, None),
                                        self._child_params[child].prompt_logprobs or 0))

    def _convert(self, step_outputs: list, req_ids: list[str] | None, out: SamplerOutput | None,
                 sample_rows: list[int] | None = None) -> list[EngineOutput]:
        row_of = {}
        if req_ids is not None and sample_rows is not None:
            row_of = {req_ids[r]: k for k, r in enumerate(sample_rows)}
        results = []
        for so in step_outputs:
            parent = self._children.get(so.request_id)
            if parent is None:
                continue
            lps = None
            k = row_of.get(so.request_id)
            if out is not None and out.logprobs is not None and k is not None and so.new_token_ids:
                lps = self._logprobs(so.request_id, out, k)
            prompt_lps = None
            if so.new_token_ids and so.request_id in self._prompt_lps:
                prompt_lps = [None, *self._prompt_lps.pop(so.request_id)]
            results.append(EngineOutput(parent[0], parent[1], so.new_token_ids, so.finished,
                                        so.finish_reason, so.stop_reason, lps, prompt_lps))
            if so.finished:
                self._forget(so.request_id)
        return results

    def _logprobs(self, child: str, out: SamplerOutput, k: int) -> list[TokenLogprobs] | None:
        n = self._child_params[child].logprobs
        if n is None:
            return None
        return _token_logprobs(out.logprobs, slice(k, k + 1), n)

    def _forget(self, child: str) -> None:
        parent = self._children.pop(child, None)
        self._child_params.pop(child, None)
        self._prompt_lps.pop(child, None)
        if parent is None:
            return
        siblings = self._parents.get(parent[0], [])
        if all(c not in self._children for c in siblings):
            self._parents.pop(parent[0], None)


def make_engine_config(model: DeepseekV4ForCausalLM, **engine_args: Any) -> EngineConfig:
    """EngineConfig with device-aware defaults: the cache stores the compute dtype (fp32 on
    CPU, bf16 on GPU, fp64 with fp64 window state for an fp64 model) unless kv_cache_dtype says
    otherwise ("fp8": 584-byte entries with FP4 indexer keys), max_model_len is the model's
    context (capped at 1M), the budget a share of free memory."""
    device = model.embed.weight.device
    args = dict(engine_args)
    unknown = set(args) - {f.name for f in dataclasses.fields(EngineConfig)}
    if unknown:
        raise ValueError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
    if args.get("kv_cache_dtype") is None:
        args["kv_cache_dtype"] = _PLAIN_NAMES.get(model.compute_dtype, "bf16")
    if model.compute_dtype == torch.float64:  # an fp64 model keeps its window state in fp64
        args.setdefault("compressor_state_dtype", "fp64")
    if args.get("index_cache_dtype") is None and args["kv_cache_dtype"] != "fp8":
        args["index_cache_dtype"] = args["kv_cache_dtype"]  # fp8 entries pair with fp4 keys
    if args.get("max_model_len") is None:
        args["max_model_len"] = min(model.config.max_position_embeddings, 1 << 20)
    if args.get("kv_cache_memory") is None:
        args["kv_cache_memory"] = default_kv_cache_memory(device)
    return EngineConfig(**args)
