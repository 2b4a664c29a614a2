"""BlockManager: per-request block tables for the three cache kinds and compressor-state slots.

Blocks are measured in source tokens for every kind (design-anchors 6.5): logical block j of a
request covers tokens [j * block_size, (j + 1) * block_size), i.e. block_size swa entries,
block_size / 4 csa entries, block_size / hca_ratio hca entries. One BlockPool per kind, each
sized from its share of ``kv_cache_memory``; a fixed pool of compressor-state slots (one per
running request). Invariant: after ``allocate`` every token in [num_computed_tokens, end) has a
slot in every kind; swa blocks wholly behind the window are returned. Pure Python: no tensors.

Prefix caching (on when a hash seed is given): once a logical block is full, its block in every
kind is registered under the block's chained hash (``cache_blocks``). A new request takes the
longest cached prefix that ends at a block boundary P and has, in every kind, what the next
token needs (``find_cached_prefix``): csa and hca blocks [0, P / B) and the swa blocks of the
window before P; the swa block that ends at P also carries CSA's previous-window rows there (the
model runner copies them into the request's state slot). Freed cached blocks stay findable until
the pool hands them out again, least recently freed first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dsv4.cache import block_hash
from dsv4.cache.block_pool import NULL_BLOCK_ID, BlockPool
from dsv4.cache.spec import CacheKind, CacheSpec, build_cache_specs, state_bytes_per_seq
from dsv4.config import ModelConfig

__all__ = ["BlockManager", "CacheSizing", "CachedPrefix", "NO_PREFIX", "num_mtp_layers"]


class CacheSizing(Protocol):
    """The sizing knobs the block manager reads (``dsv4.engine.EngineConfig`` has them)."""

    @property
    def kv_cache_memory(self) -> int | None: ...
    @property
    def block_size(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def max_num_batched_tokens(self) -> int: ...
    @property
    def kv_cache_dtype(self) -> str: ...
    @property
    def index_cache_dtype(self) -> str | None: ...
    @property
    def compressor_state_dtype(self) -> str: ...
    @property
    def enable_prefix_caching(self) -> bool: ...
    @property
    def num_speculative_tokens(self) -> int: ...

logger = logging.getLogger(__name__)


def num_mtp_layers(model_config: ModelConfig, engine_config: CacheSizing) -> int:
    """MTP layers whose sliding window the cache holds: the model's, when speculating."""
    speculating = getattr(engine_config, "num_speculative_tokens", 0) > 0
    return model_config.num_nextn_predict_layers if speculating else 0


# With prefix caching, every request slot brings this many more swa blocks to the pool. A cached
# prefix can only end where its window's swa blocks are still there, and the hits agents and
# chats need end near the tips of finished requests (the end of a turn's prompt or completion),
# which the least-recently-freed order keeps longest; a few blocks per slot keep those tips
# without giving the window kind the whole history (it costs ~7x the compressed kinds per token).
PREFIX_SWA_BLOCKS = 2


def _swa_blocks_per_seq(window: int, block_size: int, prefix_caching: bool) -> int:
    return math.ceil((window - 1) / block_size) + 1 + (PREFIX_SWA_BLOCKS if prefix_caching else 0)


@dataclass
class _RequestBlocks:
    block_ids: dict[CacheKind, list[int]]  # swa: held blocks only, first one is swa_offset
    swa_offset: int = 0  # logical index of block_ids["swa"][0] (blocks before it were released)
    state_slot: int = NULL_BLOCK_ID
    num_cached_blocks: int = 0  # logical blocks [0, n) registered in the prefix cache


@dataclass(frozen=True)
class CachedPrefix:
    """A cached prefix of ``num_tokens`` tokens (a multiple of block_size) and the blocks a
    request resuming after it holds: csa / hca from logical block 0, swa from ``swa_offset``."""

    num_tokens: int
    block_ids: dict[CacheKind, list[int]] = field(default_factory=dict)
    swa_offset: int = 0

    @property
    def boundary_block(self) -> int:
        """The swa block that ends the prefix (it keeps CSA's state there); the null block for
        an empty prefix."""
        return self.block_ids["swa"][-1] if self.num_tokens else NULL_BLOCK_ID


NO_PREFIX = CachedPrefix(0)


class BlockManager:
    """Block tables of running requests over one BlockPool per cache kind.

    Table layout for a request after ``end`` tokens (B = block_size, W = sliding window)::

        kind  logical blocks held             entries in block j
        csa   [0, ceil(end / B))              j*B/4   .. (j+1)*B/4 - 1
        hca   [0, ceil(end / B))              j*B/r   .. (j+1)*B/r - 1   (r = hca ratio)
        swa   [swa_offset, ceil(end / B))     tokens j*B .. (j+1)*B - 1; swa_offset =
                                              max(0, num_computed_tokens - W + 1) // B

    Prefix caching, speculative rollback and TP/EP build on this layout; docs/architecture.md
    ("Room for what comes next") says what each still needs.
    """

    def __init__(
        self,
        specs: Mapping[CacheKind, CacheSpec],
        block_size: int,
        num_blocks: Mapping[CacheKind, int],
        num_state_slots: int,
        hash_seed: bytes | None = None,
    ) -> None:
        if "swa" not in specs:
            raise ValueError("specs must contain the swa kind")
        for spec in specs.values():
            spec.entries_per_block(block_size)  # raises unless block_size % ratio == 0
        self.specs = dict(specs)
        self.block_size = block_size
        self.window = specs["swa"].window
        # num_blocks counts the null block of each pool; slots get their own null slot 0
        self.pools = {kind: BlockPool(num_blocks[kind], kind) for kind in specs}
        self.state_pool = BlockPool(num_state_slots + 1, "state")
        self._reqs: dict[str, _RequestBlocks] = {}
        # prefix caching is on when there is a seed for the block hashes (block_hash.hash_seed)
        self.hash_seed = hash_seed

    # ---- construction from a memory budget -------------------------------------------------
    @classmethod
    def from_config(cls, model_config: ModelConfig, engine_config: CacheSizing,
                    content_id: str = "") -> BlockManager:
        """Size the pools from ``engine_config.kv_cache_memory`` (see :meth:`plan`). With
        ``enable_prefix_caching``, ``content_id`` names what else the cached content depends on
        beyond the config and the cache dtypes (the weights, the QAT rounding switch)."""
        caching = engine_config.enable_prefix_caching
        specs = build_cache_specs(
            model_config, engine_config.kv_cache_dtype, engine_config.index_cache_dtype,
            engine_config.compressor_state_dtype, prefix_caching=caching,
            num_mtp_layers=num_mtp_layers(model_config, engine_config),
        )
        num_blocks, num_slots = cls.plan(specs, engine_config)
        seed = None
        if caching:
            seed = block_hash.hash_seed(
                model_config, engine_config.kv_cache_dtype, engine_config.index_cache_dtype,
                engine_config.compressor_state_dtype, engine_config.block_size, content_id)
        return cls(specs, engine_config.block_size, num_blocks, num_slots, seed)

    @staticmethod
    def plan(
        specs: Mapping[CacheKind, CacheSpec], engine_config: CacheSizing
    ) -> tuple[dict[CacheKind, int], int]:
        """Split the byte budget: (num_blocks per kind incl. the null block, num_state_slots).

        Fixed shares first: per running request one state slot and the swa blocks of a decode
        window (ceil((W - 1) / B) + 1, and PREFIX_SWA_BLOCKS more with prefix caching), plus swa
        blocks for one full-budget prefill chunk. The rest goes to csa and hca, which every
        request holds in equal numbers (ceil(end / B)), so both pools get the same count. If the budget cannot hold max_num_seqs requests and
        one max_model_len request, fewer state slots are planned (the scheduler then runs fewer
        requests at once); if not even one fits, ValueError.
        """
        budget = engine_config.kv_cache_memory
        if budget is None:
            raise ValueError("kv_cache_memory is not set (the model runner profiles it)")
        block, window = engine_config.block_size, specs["swa"].window
        swa_bytes = specs["swa"].block_bytes(block)
        compressed = [k for k in specs if k != "swa"]
        row_bytes = sum(specs[k].block_bytes(block) for k in compressed)  # one csa + one hca
        swa_per_seq = _swa_blocks_per_seq(window, block, engine_config.enable_prefix_caching)
        per_seq = swa_per_seq * swa_bytes + state_bytes_per_seq(specs)
        swa_once = math.ceil(engine_config.max_num_batched_tokens / block) + 1
        min_rows = math.ceil(engine_config.max_model_len / block)
        # null blocks of every pool + null state slot + one chunk of swa + one full-length seq
        fixed = (swa_once + 1) * swa_bytes + (1 + min_rows) * row_bytes + state_bytes_per_seq(specs)
        num_seqs = min(engine_config.max_num_seqs, max(0, (budget - fixed) // per_seq))
        if num_seqs < 1:
            raise ValueError(
                f"kv_cache_memory {budget} B cannot hold one request of max_model_len "
                f"{engine_config.max_model_len} (needs {fixed + per_seq} B); lower max_model_len "
                f"or max_num_batched_tokens, or give the cache more memory"
            )
        if num_seqs < engine_config.max_num_seqs:
            logger.warning("KV budget holds state for %d of max_num_seqs=%d requests",
                           num_seqs, engine_config.max_num_seqs)
        num_blocks = {"swa": 1 + swa_once + num_seqs * swa_per_seq}
        left = budget - num_blocks["swa"] * swa_bytes - (num_seqs + 1) * state_bytes_per_seq(specs)
        for kind in compressed:
            num_blocks[kind] = left // row_bytes
        return num_blocks, num_seqs

    @staticmethod
    def memory_needed(specs: Mapping[CacheKind, CacheSpec], engine_config: CacheSizing) -> int:
        """Bytes :meth:`plan` needs to run ``max_num_seqs`` requests of ``max_model_len`` tokens
        at once: more would never be used."""
        block, window = engine_config.block_size, specs["swa"].window
        swa_bytes = specs["swa"].block_bytes(block)
        row_bytes = sum(s.block_bytes(block) for k, s in specs.items() if k != "swa")
        seqs = engine_config.max_num_seqs
        swa_blocks = (1 + math.ceil(engine_config.max_num_batched_tokens / block) + 1
                      + seqs * _swa_blocks_per_seq(window, block,
                                                   engine_config.enable_prefix_caching))
        rows = 1 + seqs * math.ceil(engine_config.max_model_len / block)
        return swa_blocks * swa_bytes + rows * row_bytes + (seqs + 1) * state_bytes_per_seq(specs)

    def memory_bytes(self) -> int:
        """Bytes the runner must allocate for these pools and state slots (null ones included)."""
        kv = sum(self.pools[k].num_blocks * s.block_bytes(self.block_size)
                 for k, s in self.specs.items())
        return kv + self.state_pool.num_blocks * state_bytes_per_seq(self.specs)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_state_slots(self) -> int:
        return self.state_pool.num_usable_blocks

    def num_free_blocks(self, kind: CacheKind) -> int:
        return self.pools[kind].num_free_blocks

    def usage(self) -> float:
        """Fraction of the fullest pool in use (what bounds admission)."""
        return max(pool.usage for pool in self.pools.values())

    def all_free(self) -> bool:
        """True when no request holds anything (e.g. after every request finished)."""
        pools = [*self.pools.values(), self.state_pool]
        return not self._reqs and all(p.num_free_blocks == p.num_usable_blocks for p in pools)

    def can_fit(self, num_tokens: int, max_chunk_tokens: int) -> bool:
        """Whether one request of ``num_tokens`` tokens, prefilled in chunks of at most
        ``max_chunk_tokens``, fits the pools when it runs alone (else it could never finish)."""
        num_logical = math.ceil(num_tokens / self.block_size)
        chunk = min(num_tokens, max_chunk_tokens)
        swa_need = math.ceil((chunk + self.window - 1) / self.block_size) + 1
        for kind, pool in self.pools.items():
            need = min(swa_need, num_logical) if kind == "swa" else num_logical
            if need > pool.num_usable_blocks:
                return False
        return self.state_pool.num_usable_blocks >= 1

    def has_request(self, request_id: str) -> bool:
        return request_id in self._reqs

    def block_tables(self, request_id: str) -> dict[CacheKind, list[int]]:
        """Copies of the request's tables per kind (swa starts at :meth:`swa_block_offset`)."""
        req = self._reqs[request_id]
        return {kind: list(ids) for kind, ids in req.block_ids.items()}

    def swa_block_offset(self, request_id: str) -> int:
        return self._reqs[request_id].swa_offset

    def state_slot(self, request_id: str) -> int:
        return self._reqs[request_id].state_slot

    # ---- allocation ------------------------------------------------------------------------
    def _first_live_swa_block(self, num_computed_tokens: int) -> int:
        # the next token (position num_computed_tokens) reads [p - W + 1, p]
        return max(0, num_computed_tokens - self.window + 1) // self.block_size

    def _num_needed(
        self, req: _RequestBlocks | None, num_computed_tokens: int, end: int
    ) -> dict[CacheKind, int]:
        """New blocks per kind to cover [num_computed_tokens, end) (after swa release)."""
        num_logical = math.ceil(end / self.block_size)
        needed: dict[CacheKind, int] = {}
        for kind in self.specs:
            held = len(req.block_ids[kind]) if req else 0
            if kind == "swa":
                offset = req.swa_offset if req else 0
                first = max(offset, self._first_live_swa_block(num_computed_tokens))
                held = max(0, offset + held - first)
                needed[kind] = max(0, num_logical - first - held)
            else:
                needed[kind] = max(0, num_logical - held)
        return needed

    def can_allocate(
        self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
        prefix: CachedPrefix = NO_PREFIX,
    ) -> bool:
        """Whether :meth:`allocate` with the same arguments would succeed."""
        req = self._reqs.get(request_id)
        taken = dict.fromkeys(self.specs, 0)  # free cached blocks a prefix hit takes
        if prefix.num_tokens:
            req = self._prefix_request(prefix)
            for kind, ids in prefix.block_ids.items():
                taken[kind] = sum(1 for b in ids if self.pools[kind].ref_count(b) == 0)
        end = num_computed_tokens + num_new_tokens
        needed = self._num_needed(req, num_computed_tokens, end)
        for kind, num in needed.items():
            free = self.pools[kind].num_free_blocks - taken[kind]
            if kind == "swa" and req is not None:
                free += self._num_swa_releasable(req, num_computed_tokens)
            if num > free:
                return False
        no_slot = req is None or req.state_slot == NULL_BLOCK_ID
        return not (no_slot and self.state_pool.num_free_blocks == 0)

    def allocate(
        self, request_id: str, num_computed_tokens: int, num_new_tokens: int,
        prefix: CachedPrefix = NO_PREFIX,
    ) -> bool:
        """Give the request slots for tokens [num_computed_tokens, num_computed_tokens +
        num_new_tokens) in every kind, plus a state slot. A new request may start after a
        cached ``prefix`` (then num_computed_tokens == prefix.num_tokens): it shares the
        prefix's blocks. All or nothing: returns False and changes nothing (but releasing dead
        swa blocks) when short."""
        if num_new_tokens < 0:
            raise ValueError("token counts must be >= 0")
        req = self._reqs.get(request_id)
        if prefix.num_tokens and (req is not None or num_computed_tokens != prefix.num_tokens):
            raise ValueError(f"a cached prefix starts a new request at its end, not "
                             f"{request_id!r} at {num_computed_tokens}")
        if req is not None:
            self.release_swa_blocks(request_id, num_computed_tokens)
        if not self.can_allocate(request_id, num_computed_tokens, num_new_tokens, prefix):
            return False
        if prefix.num_tokens:
            for kind, ids in prefix.block_ids.items():
                self.pools[kind].touch(ids)
            req = self._reqs[request_id] = self._prefix_request(prefix)
        end = num_computed_tokens + num_new_tokens
        needed = self._num_needed(req, num_computed_tokens, end)
        if req is None:
            first = self._first_live_swa_block(num_computed_tokens)
            req = _RequestBlocks(block_ids={kind: [] for kind in self.specs}, swa_offset=first)
            self._reqs[request_id] = req
        if req.state_slot == NULL_BLOCK_ID:
            req.state_slot = self.state_pool.allocate(1)[0]
        for kind, num in needed.items():
            req.block_ids[kind].extend(self.pools[kind].allocate(num))
        return True

    def _prefix_request(self, prefix: CachedPrefix) -> _RequestBlocks:
        """The tables of a request that holds exactly ``prefix`` (no state slot yet)."""
        return _RequestBlocks(block_ids={k: list(v) for k, v in prefix.block_ids.items()},
                              swa_offset=prefix.swa_offset,
                              num_cached_blocks=prefix.num_tokens // self.block_size)

    # ---- prefix caching --------------------------------------------------------------------
    @property
    def caching(self) -> bool:
        return self.hash_seed is not None

    def hash_blocks(self, hashes: list[bytes], token_ids: Sequence[int],
                    salt: str | None = None) -> list[bytes]:
        """Extend ``hashes`` (in place) to every full block of ``token_ids``; a ``salt`` starts
        a chain of its own (only requests with the same salt share blocks)."""
        if self.hash_seed is None:
            raise RuntimeError("prefix caching is off: no block hashes")
        seed = b""  # the seed only starts a chain: unused once hashes has one, or without a block
        if not hashes and len(token_ids) >= self.block_size:
            seed = self.hash_seed if salt is None else block_hash.hash_seed(self.hash_seed.hex(),
                                                                            salt)
        return block_hash.extend_block_hashes(hashes, seed, token_ids, self.block_size)

    def find_cached_prefix(self, hashes: Sequence[bytes], max_tokens: int) -> CachedPrefix:
        """The longest cached prefix of at most ``max_tokens`` tokens whose every kind is there:
        csa / hca blocks from the start, and the swa blocks the next token's window reads
        (earlier swa blocks may have been evicted: they are not needed)."""
        if not self.caching:
            return NO_PREFIX
        limit = min(len(hashes), max_tokens // self.block_size)
        compressed = [self.pools[k] for k in self.specs if k != "swa"]
        num = 0
        while num < limit and all(p.lookup(hashes[num]) is not None for p in compressed):
            num += 1
        swa = self.pools["swa"]
        for num_blocks in range(num, 0, -1):
            end = num_blocks * self.block_size
            first = self._first_live_swa_block(end)
            window = [swa.lookup(h) for h in hashes[first:num_blocks]]
            if None in window:
                continue
            tables = {k: [self.pools[k].lookup(h) for h in hashes[:num_blocks]]
                      for k in self.specs if k != "swa"}
            tables["swa"] = window
            return CachedPrefix(end, tables, first)
        return NO_PREFIX

    def cache_blocks(self, request_id: str, hashes: Sequence[bytes],
                     num_computed_tokens: int) -> int:
        """Register the request's blocks that are full after ``num_computed_tokens`` tokens
        (and not registered yet) under ``hashes``. Call it after the step that computed them
        and before their swa blocks are released. Returns how many logical blocks were new."""
        req = self._reqs.get(request_id)
        if req is None or not self.caching:
            return 0
        num_full = min(num_computed_tokens // self.block_size, len(hashes))
        first = req.num_cached_blocks
        for j in range(first, num_full):
            for kind, ids in req.block_ids.items():
                at = j - req.swa_offset if kind == "swa" else j
                if 0 <= at < len(ids):
                    self.pools[kind].cache_block(ids[at], hashes[j])
        req.num_cached_blocks = max(first, num_full)
        return max(0, num_full - first)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (vLLM's reset_prefix_cache). Returns how many hashes
        were dropped over all kinds."""
        return sum(pool.reset_cache() for pool in self.pools.values())

    def _num_swa_releasable(self, req: _RequestBlocks, num_computed_tokens: int) -> int:
        num_dead = min(len(req.block_ids["swa"]),
                       self._first_live_swa_block(num_computed_tokens) - req.swa_offset)
        pool = self.pools["swa"]
        return sum(1 for b in req.block_ids["swa"][:max(0, num_dead)] if pool.ref_count(b) == 1)

    def release_swa_blocks(self, request_id: str, num_computed_tokens: int) -> int:
        """Return the request's swa blocks that lie wholly behind the window of its next token
        (position ``num_computed_tokens``). Returns how many blocks went back to the pool."""
        req = self._reqs.get(request_id)
        if req is None:
            return 0
        first = self._first_live_swa_block(num_computed_tokens)
        if first <= req.swa_offset:
            return 0
        ids = req.block_ids["swa"]
        num_dead = min(len(ids), first - req.swa_offset)
        freed = self.pools["swa"].free(ids[:num_dead])
        req.block_ids["swa"] = ids[num_dead:]
        req.swa_offset = first
        return freed

    def free(self, request_id: str) -> None:
        """Release everything the request holds (finish, abort or preemption). Idempotent."""
        req = self._reqs.pop(request_id, None)
        if req is None:
            return
        for kind, ids in req.block_ids.items():
            self.pools[kind].free(reversed(ids))  # tail first: later a prefix cache keeps heads
        self.state_pool.free([req.state_slot])

    def __repr__(self) -> str:
        pools = ", ".join(repr(p) for p in self.pools.values())
        return f"BlockManager(block_size={self.block_size}, {pools}, {self.state_pool!r})"
