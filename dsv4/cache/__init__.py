"""The paged KV cache: bookkeeping (pure Python) and storage (tensors).

``spec`` says what each kind (swa / csa / hca) stores and its bytes; ``block_pool`` hands out
block ids with ref counts; ``block_manager`` keeps per-request block tables and state slots (these
three never touch tensors); ``kv_cache`` holds the storage tensors and the paged stores the model
reads and writes; ``kv_format`` the entry byte formats.
"""

from __future__ import annotations

from dsv4.cache.block_manager import BlockManager
from dsv4.cache.block_pool import NULL_BLOCK_ID, BlockPool
from dsv4.cache.spec import (
    CACHE_KINDS,
    CacheSpec,
    build_cache_specs,
    kv_bytes_per_seq,
    kv_bytes_per_token,
    state_bytes_per_seq,
)

__all__ = [
    "BlockManager",
    "BlockPool",
    "CACHE_KINDS",
    "CacheSpec",
    "NULL_BLOCK_ID",
    "build_cache_specs",
    "kv_bytes_per_seq",
    "kv_bytes_per_token",
    "state_bytes_per_seq",
]
