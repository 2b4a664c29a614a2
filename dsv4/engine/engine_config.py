"""EngineConfig: the frozen knobs of scheduling and KV-cache sizing (vLLM names).

Validated once in ``__post_init__`` (ValueError naming the field); ``check_model`` adds the checks
that need the ModelConfig (block_size a multiple of every compress ratio, context length).
``kv_cache_memory`` is the byte budget for all KV pools *and* compressor-state slots; None means
"not known yet": ``EngineArgs.create_engine_config`` sizes it (``dsv4.engine.memory``) and fills
it in with ``replace`` before the engine is built. It holds no model facts itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dsv4.cache.spec import INDEX_CACHE_DTYPES, KV_CACHE_DTYPES, STATE_DTYPES
from dsv4.config import ModelConfig

__all__ = ["EngineConfig", "MAX_MODEL_LEN"]

MAX_MODEL_LEN = 1_048_576  # DeepSeek-V4's context (max_position_embeddings of both releases)


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = MAX_MODEL_LEN  # prompt + output tokens of one request, at most
    max_num_seqs: int = 256  # running requests at once (also the number of state slots)
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    block_size: int = 256  # source tokens per cache block, every kind (design-anchors 6.5)
    kv_cache_memory: int | None = None  # bytes for KV pools + compressor states; None: unsized
    kv_cache_dtype: str = "bf16"  # main / window entries: "bf16" | "fp8" (584 B) | "fp32" | "fp64"
    index_cache_dtype: str | None = None  # indexer keys: "fp4" | "fp8" | plain; None:
    # fp8 -> fp4, otherwise the same as kv_cache_dtype
    compressor_state_dtype: str = "fp32"  # "fp32" | "bf16" | "fp64"
    enable_prefix_caching: bool = True  # reuse cached prefixes (whole blocks, every kind)
    # draft tokens the MTP block proposes per decoding request and step (0: no speculation)
    num_speculative_tokens: int = 0
    compile_decode: bool = False  # decode steps through compiled regions (DecodeGraphs)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len > MAX_MODEL_LEN:
            raise ValueError(f"max_model_len must be <= {MAX_MODEL_LEN}, got {self.max_model_len}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got "
                             f"{self.num_speculative_tokens!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.index_cache_dtype is not None and self.index_cache_dtype not in INDEX_CACHE_DTYPES:
            raise ValueError(f"index_cache_dtype must be one of {INDEX_CACHE_DTYPES}, got "
                             f"{self.index_cache_dtype!r}")
        if self.compressor_state_dtype not in STATE_DTYPES:
            raise ValueError(f"compressor_state_dtype must be one of {STATE_DTYPES}, got "
                             f"{self.compressor_state_dtype!r}")

    def check_model(self, model_config: ModelConfig) -> None:
        """Raise ValueError when this engine config cannot serve ``model_config``."""
        if self.num_speculative_tokens:
            if model_config.drafter == "dspark":
                raise ValueError(
                    "this checkpoint drafts with DSpark (dspark_* keys in config.json), which "
                    "dsv4 does not support yet; serve it without --speculative-config")
            if model_config.num_nextn_predict_layers < 1:
                raise ValueError("speculative decoding with MTP needs the model's MTP block "
                                 "(num_nextn_predict_layers >= 1); this config has none")
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {model_config.max_position_embeddings}"
            )
        for ratio in sorted({r for r in model_config.compress_ratios if r}):
            if self.block_size % ratio:
                raise ValueError(
                    f"block_size {self.block_size} must be a multiple of every compress ratio "
                    f"(got ratio {ratio})"
                )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
