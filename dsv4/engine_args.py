"""EngineArgs: every engine option in one place, with its default, help text and validation.

``dsv4 generate``, ``dsv4 serve``, ``LLM(...)`` and ``AsyncLLM`` all build their engine from an
``EngineArgs``; the two commands get their engine flags from ``add_cli_args`` (vLLM's names and
spellings: ``--max-model-len``, ``--kv-cache-memory 8GiB``, ``--gpu-memory-utilization`` ...), so
no flag is declared twice. Defaults that depend on the device or the checkpoint are resolved in
``create_engine_config`` once the model is loaded:

- ``max_model_len``: the model's context (capped at 1M; 16K for the embedded demo model, so it
  starts small);
- ``max_num_seqs``: 256 on CUDA, 32 on CPU;
- ``max_num_batched_tokens`` (the token budget of one step, i.e. the prefill chunk): 8192 on
  CUDA, 2048 on CPU (a short request waits for at most one chunk);
- cache formats: the compute dtype (fp32 on CPU, bf16 on CUDA, fp64 with fp64 compressor state
  for an fp64 model); ``fp8`` gives 584-byte entries with FP4 indexer keys;
- ``kv_cache_memory``: from ``dsv4.engine.memory`` (never more than ``max_num_seqs`` sequences
  of ``max_model_len`` tokens can use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv4.distributed import ParallelConfig
from dsv4.engine.launch_plan import LaunchError, LaunchPlan
from dsv4.ops import parse_spec as parse_ops

if TYPE_CHECKING:
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
    from dsv4.engine.engine_config import EngineConfig

__all__ = ["DTYPES", "EngineArgs", "LaunchError", "LaunchPlan", "parse_bytes"]

DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16}
DEMO_MAX_MODEL_LEN = 16384  # the embedded demo model's default context (pass more if needed)
_PLAIN_CACHE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'8GiB', '512MiB', '2e9', '1073741824' (or an int) -> bytes; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {text!r} (e.g. 8GiB, 512MiB, 1073741824)")
        try:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
        except ValueError as exc:
            raise ValueError(f"not a byte size: {text!r}") from exc
    if value < 1:
        raise ValueError(f"a byte size must be positive, got {text!r}")
    return int(value)


def _opt(help: str, *, type: Any = None, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, aliases: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"help": help, "type": type, "choices": choices, "metavar": metavar,
            "aliases": aliases}


@dataclass
class EngineArgs:
    model: str | None = field(default=None, metadata=_opt(
        "checkpoint directory, or a Hugging Face repo id already in the local HF cache "
        "(default: the embedded demo model)"))
    device: str | None = field(default=None, metadata=_opt(
        "cpu or cuda (default: cuda if available)"))
    dtype: str = field(default="auto", metadata=_opt(
        "compute dtype (auto: float32 on CPU, bfloat16 on GPU, FP8/FP4 weights kept); any other "
        "value expands every weight to it at load. float64 is the exact mode: logits do not "
        "depend on chunking or batching, QAT rounding included", choices=tuple(DTYPES)))
    emulate_quant: bool = field(default=True, metadata=_opt(
        "the reference's FP8/FP4 KV and indexer rounding (--no-emulate-quant turns it off, as "
        "transformers has it)"))
    max_model_len: int | None = field(default=None, metadata=_opt(
        "prompt + output tokens per request (default: the model's context, at most 1M; 16384 "
        "for the embedded demo model)",
        type=int))
    max_num_seqs: int | None = field(default=None, metadata=_opt(
        "requests running at once (default: 256 on CUDA, 32 on CPU)", type=int))
    max_num_batched_tokens: int | None = field(default=None, metadata=_opt(
        "tokens per engine step, i.e. the prefill chunk (default: 8192 on CUDA, 2048 on CPU)",
        type=int))
    block_size: int = field(default=256, metadata=_opt(
        "source tokens per cache block (a multiple of every compress ratio)", type=int))
    kv_cache_memory: int | None = field(default=None, metadata=_opt(
        "KV-cache budget, e.g. 8GiB or 512MiB (default: what max_num_seqs x max_model_len can "
        "use, capped by the memory utilization)", type=parse_bytes, metavar="BYTES"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_opt(
        "CUDA: fraction of device memory for weights, activations and KV cache", type=float))
    cpu_memory_utilization: float = field(default=0.5, metadata=_opt(
        "CPU: fraction of available memory (after loading) the KV cache may take", type=float))
    kv_cache_dtype: str = field(default="auto", metadata=_opt(
        "cache entry format (auto: the compute dtype; fp8: 584-byte entries with FP4 indexer "
        "keys)", choices=("auto", "fp32", "bf16", "fp64", "fp8")))
    index_cache_dtype: str = field(default="auto", metadata=_opt(
        "indexer key format (auto: fp4 with fp8 entries, else as kv_cache_dtype)",
        choices=("auto", "fp4", "fp8", "fp32", "bf16", "fp64")))
    compressor_state_dtype: str = field(default="auto", metadata=_opt(
        "compressor window state (auto: fp64 for an fp64 model, else fp32)",
        choices=("auto", "fp32", "bf16", "fp64")))
    enable_prefix_caching: bool = field(default=True, metadata=_opt(
        "reuse the cache of a prompt's longest cached prefix (whole blocks, every cache kind); "
        "--no-enable-prefix-caching turns it off"))
    speculative_config: dict[str, Any] | str | None = field(default=None, metadata=_opt(
        'speculative decoding, as JSON: {"method": "mtp", "num_speculative_tokens": K} '
        "(vLLM's spelling): V4's MTP block drafts K tokens per step, verified in one batched "
        "step; off by default", metavar="JSON"))
    compile_decode: bool = field(default=False, metadata=_opt(
        "run decode steps through regions compiled once per batch-size bucket (torch.compile "
        "on CPU, CUDA graphs on GPU; one rank only). Off: eager, the reference"))
    tensor_parallel_size: int = field(default=1, metadata=_opt(
        "ranks that split attention heads, indexer heads, output groups, embedding and head "
        "(and, with the data-parallel ranks, the routed experts); one process per rank, "
        "started by dsv4", type=int, aliases=("-tp",)))
    data_parallel_size: int = field(default=1, metadata=_opt(
        "data-parallel attention groups (each its own requests and KV cache; the MoE runs over "
        "all tp x dp ranks)", type=int, aliases=("-dp",)))
    enable_expert_parallel: bool = field(default=False, metadata=_opt(
        "split the routed experts whole over all ranks (EP) instead of splitting every "
        "expert's width"))
    expert_parallel_size: int | None = field(default=None, metadata=_opt(
        "groups the routed experts are split into, whole (SGLang's --ep-size; default: all "
        "ranks with --enable-expert-parallel, else none); the world / EP ranks of a group split "
        "each expert's width", type=int, aliases=("-ep",)))
    nnodes: int = field(default=1, metadata=_opt(
        "nodes the ranks are spread over (the same flags on every node, with --node-rank and "
        "--dist-init-addr)", type=int))
    node_rank: int = field(default=0, metadata=_opt(
        "this node's place among --nnodes; node 0 runs the scheduler and the API server, the "
        "others only workers", type=int))
    dist_init_addr: str | None = field(default=None, metadata=_opt(
        "HOST:PORT of node 0 where the ranks meet (needed with --nnodes > 1)",
        metavar="HOST:PORT"))
    ops: str | None = field(default=None, metadata=_opt(
        "backend per hot op, e.g. rms_norm=torch,sparse_attention=triton or all=torch (default: "
        "$DSV4_OPS, else Triton kernels on CUDA where written, torch elsewhere)",
        metavar="OP=BACKEND,..."))
    dist_timeout: float = field(default=120.0, metadata=_opt(
        "seconds a collective between ranks may take before the engine gives up (a dead or "
        "hung worker fails requests instead of hanging the server)", type=float))

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):  # LLM(dtype=torch.float64) as in vLLM
            names = {v: k for k, v in DTYPES.items() if v is not None}
            if self.dtype not in names:
                raise ValueError(f"dtype must be one of {sorted(names.values())}, got "
                                 f"{self.dtype}")
            self.dtype = names[self.dtype]
        if self.model is not None:
            self.model = str(self.model)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got "
                                 f"{getattr(self, f.name)!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "tensor_parallel_size", "data_parallel_size", "nnodes",
                     "expert_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("gpu_memory_utilization", "cpu_memory_utilization"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        self.speculative_config = speculative_config_dict(self.speculative_config)
        parallel = self.parallel_config()  # a layout that cannot exist fails here
        if self.compile_decode and parallel.world_size > 1:
            raise ValueError("compile_decode runs on one rank only, got a world of "
                             f"{parallel.world_size} ranks")
        parse_ops(self.ops)  # a bad op or backend name fails here, naming it
        if not isinstance(self.dist_timeout, (int, float)) or self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be a positive number of seconds, got "
                             f"{self.dist_timeout!r}")

    # ---- command line ------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *,
                     model_positional: bool = False) -> argparse.ArgumentParser:
        """Add one flag per field (``--max-model-len`` ...); the model is a positional
        argument (``dsv4 serve MODEL``) or ``--model``."""
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if f.name == "model" and model_positional:
                parser.add_argument("model", nargs="?", default=None, help=meta["help"])
                continue
            flags = ("--" + f.name.replace("_", "-"), *meta.get("aliases", ()))
            if f.type in (bool, "bool"):
                group.add_argument(*flags, action=argparse.BooleanOptionalAction,
                                   default=f.default, help=meta["help"])
                continue
            kwargs = {k: meta[k] for k in ("type", "choices", "metavar") if meta.get(k)}
            help = meta["help"]
            if f.default is not None and "default:" not in help:
                help += f" (default: {f.default})"
            if meta.get("type") is parse_bytes:
                kwargs["type"] = _cli_bytes
            group.add_argument(*flags, dest=f.name, default=f.default, help=help, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    # ---- building an engine ------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

    def model_path(self, announce: bool = False) -> Path:
        """The checkpoint directory (the demo model when ``model`` is None)."""
        from dsv4.demo import resolve_model

        return resolve_model(self.model, announce=announce)[0]

    def create_engine(self, *, progress: bool = False,
                      eos_token_id: int | None = None) -> LLMEngine:
        """Load the checkpoint and build the engine (cache sized as the module says)."""
        from dsv4.engine.llm_engine import LLMEngine

        parallel = self.parallel_config()
        plan = self.launch_plan()
        if not plan.is_driver_node:
            raise LaunchError("this node runs workers only (--node-rank > 0, or a torchrun "
                              "rank > 0): start it with `dsv4 serve ... --node-rank N`")
        if parallel.world_size > 1:
            from dsv4.engine.executor import start_workers

            model, config, workers = start_workers(self, parallel, plan, self.dist_timeout,
                                                   progress=progress)
            return LLMEngine(model, config, eos_token_id, workers)
        from dsv4.model.loader import load_model

        model = load_model(self.model_path(), device=self.device, dtype=self.torch_dtype,
                           emulate_quant=self.emulate_quant, progress=progress, ops=self.ops)
        return LLMEngine(model, self.create_engine_config(model), eos_token_id)

    def launch_plan(self) -> LaunchPlan:
        """Where this process stands in the world (LaunchError for flags that do not fit)."""
        return LaunchPlan.create(self.tensor_parallel_size * self.data_parallel_size,
                                 self.nnodes, self.node_rank, self.dist_init_addr)

    def run_worker_node(self) -> None:
        """Run this node's ranks (a node other than 0) until the driver stops them."""
        from dsv4.engine.executor import run_worker_node

        run_worker_node(self, self.parallel_config(), self.launch_plan(), self.dist_timeout)

    @property
    def num_speculative_tokens(self) -> int:
        """Draft tokens per step (0: speculation off)."""
        spec = self.speculative_config
        return int(spec["num_speculative_tokens"]) if spec else 0

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.data_parallel_size,
                              self.enable_expert_parallel, self.expert_parallel_size or 0)

    def create_engine_config(self, model: DeepseekV4ForCausalLM,
                             memory_sharers: int = 1) -> EngineConfig:
        """The frozen EngineConfig for this loaded model, device-aware defaults resolved.
        memory_sharers: ranks of a multi-process engine that share this device's memory (the
        CPU ranks of a node); each takes its part of the utilization. With several ranks every
        one profiles, so the profiling forward's collectives meet."""
        from dsv4.cache.block_manager import BlockManager, num_mtp_layers
        from dsv4.cache.spec import build_cache_specs
        from dsv4.engine.engine_config import MAX_MODEL_LEN, EngineConfig
        from dsv4.engine.memory import kv_cache_budget, profile_forward_peak

        device = model.embed.weight.device
        cuda = device.type == "cuda"
        kv = self.kv_cache_dtype
        if kv == "auto":
            kv = _PLAIN_CACHE_NAMES.get(model.compute_dtype, "bf16")
        index = self.index_cache_dtype
        if index == "auto":
            index = None if kv == "fp8" else kv  # None: fp8 entries pair with fp4 keys
        state = self.compressor_state_dtype
        if state == "auto":
            state = "fp64" if model.compute_dtype == torch.float64 else "fp32"
        context = min(model.config.max_position_embeddings, MAX_MODEL_LEN)
        if "dsv4_demo_version" in model.config.extra:  # the demo starts small and fast
            context = min(context, DEMO_MAX_MODEL_LEN)
        config = EngineConfig(
            max_model_len=self.max_model_len or context,
            max_num_seqs=self.max_num_seqs or (256 if cuda else 32),
            max_num_batched_tokens=self.max_num_batched_tokens or (8192 if cuda else 2048),
            block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
            kv_cache_dtype=kv, index_cache_dtype=index, compressor_state_dtype=state,
            enable_prefix_caching=self.enable_prefix_caching, compile_decode=self.compile_decode,
            num_speculative_tokens=self.num_speculative_tokens)
        config.check_model(model.config)
        if config.num_speculative_tokens and not model.mtp:
            raise ValueError("--speculative-config needs the checkpoint's MTP block (mtp.0.*), "
                             "and this checkpoint has none")
        if config.kv_cache_memory is not None:
            return config
        specs = build_cache_specs(model.config, kv, index, state,
                                  prefix_caching=self.enable_prefix_caching,
                                  num_mtp_layers=num_mtp_layers(model.config, config))
        needed = BlockManager.memory_needed(specs, config)

        def profile() -> int:
            ids = torch.zeros(1, config.max_num_batched_tokens, dtype=torch.long, device=device)

            # a speculating step verifies every row's drafts: logits (and the sampler's
            # copies of them) for up to (K + 1) positions per running request
            rows = min(config.max_num_seqs * (config.num_speculative_tokens + 1),
                       config.max_num_batched_tokens) if config.num_speculative_tokens else 1

            @torch.inference_mode()
            def forward() -> None:
                h = model.hidden_streams(ids, model.new_cache())
                logits = model.logits(h[:, -rows:])
                if rows > 1:
                    logits.log_softmax(-1).sort(-1)

            return profile_forward_peak(forward, device)

        utilization = self.gpu_memory_utilization if cuda else self.cpu_memory_utilization
        budget = kv_cache_budget(device, needed, utilization / memory_sharers, profile,
                                 always_profile=model.parallel.config.world_size > 1)
        return config.replace(kv_cache_memory=budget)


SPECULATIVE_METHODS = ("mtp", "deepseek_mtp")  # vLLM names V4's MTP drafter both ways
MAX_SPECULATIVE_TOKENS = 8


def speculative_config_dict(value: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``--speculative-config`` (a JSON object or a dict) checked and normalized to
    {"method": "mtp", "num_speculative_tokens": K}; None (or {}) when off. ValueError names the
    field at fault."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
    unknown = sorted(set(value) - {"method", "num_speculative_tokens", "model"})
    if unknown:
        raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)} (known: "
                         f"method, num_speculative_tokens)")
    method = value.get("method", "mtp")
    if method == "dspark":
        raise ValueError("speculative_config: the DSpark drafter of the -0731 checkpoints is "
                         "not supported yet; use method \"mtp\" with a checkpoint that has "
                         "an MTP block")
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative_config.method must be one of "
                         f"{', '.join(SPECULATIVE_METHODS)}, got {method!r}")
    k = value.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
    if value.get("model") is not None:
        raise ValueError("speculative_config.model: the MTP drafter is the checkpoint's own "
                         "block; a separate draft model is not supported")
    return {"method": "mtp", "num_speculative_tokens": k}


def _cli_bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
