"""BlockPool: a fixed number of equally sized blocks of one cache kind, as integer ids.

Invariants: block 0 is the null block (never handed out; padding lanes and unused table slots
point at it); every other block is either on the free queue with ref count 0 or held with ref
count >= 1; ``allocate`` is all-or-nothing. A full block whose content is known can be given a
hash (``cache_block``): it then stays findable by that hash (``lookup``) while held and after it
is freed, until ``allocate`` hands it out again (the eviction). The free queue is in eviction
order, least recently freed first, as in vLLM; a cached block found again leaves the queue
(``touch``). Pure Python: the pool owns ids, never memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["BlockPool", "NULL_BLOCK_ID"]

NULL_BLOCK_ID = 0


class BlockPool:
    """Free queue + ref counts over ``num_blocks`` block ids (id 0 reserved as null block),
    and the hash -> block map of the blocks a prefix cache can find."""

    def __init__(self, num_blocks: int, name: str = "") -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool {name!r}: num_blocks must be >= 1 (the null block)")
        self.name = name
        self.num_blocks = num_blocks  # including the null block
        self.ref_counts: list[int] = [0] * num_blocks
        # ref-0 blocks in eviction order: freed blocks go to the back, allocation takes from the
        # front, so a freed block that still holds a findable prefix is reused last
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self.num_evictions = 0  # cached blocks handed out again (their content dropped)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones among them: allocating evicts them)."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, held or not."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks currently held (0.0 .. 1.0)."""
        usable = self.num_usable_blocks
        return 0.0 if usable == 0 else 1.0 - self.num_free_blocks / usable

    def ref_count(self, block_id: int) -> int:
        return self.ref_counts[block_id]

    def lookup(self, block_hash: bytes) -> int | None:
        """The block that holds the content ``block_hash`` names, or None."""
        return self._cached.get(block_hash)

    # ---- mutation --------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out ``num_blocks`` blocks with ref count 1, evicting the least recently freed
        cached ones first; raises if too few are free."""
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if num_blocks > len(self._free):
            raise RuntimeError(
                f"BlockPool {self.name!r}: {num_blocks} blocks asked, {len(self._free)} free"
            )
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self.ref_counts[block_id] = 1
            block_hash = self._hash_of[block_id]
            if block_hash is not None:
                del self._cached[block_hash]
                self._hash_of[block_id] = None
                self.num_evictions += 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share already held blocks (forked requests)."""
        for block_id in block_ids:
            if block_id == NULL_BLOCK_ID or self.ref_counts[block_id] < 1:
                raise RuntimeError(f"BlockPool {self.name!r}: incref of free block {block_id}")
            self.ref_counts[block_id] += 1

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to cached blocks (a prefix hit): a free one leaves the free
        queue, so it is no longer evictable."""
        for block_id in block_ids:
            if self._hash_of[block_id] is None:
                raise RuntimeError(f"BlockPool {self.name!r}: touch of uncached block {block_id}")
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Make a held, full block findable by ``block_hash``. False (and nothing changes)
        when another block already holds that content or this one has a hash already."""
        if self.ref_counts[block_id] < 1:
            raise RuntimeError(f"BlockPool {self.name!r}: caching free block {block_id}")
        if block_hash in self._cached or self._hash_of[block_id] is not None:
            return False
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def free(self, block_ids: Iterable[int]) -> int:
        """Drop one reference to each block; blocks reaching 0 go to the back of the free
        queue (cached ones stay findable until evicted). Returns how many became free."""
        num_freed = 0
        for block_id in block_ids:
            if block_id == NULL_BLOCK_ID:
                continue
            count = self.ref_counts[block_id]
            if count < 1:
                raise RuntimeError(f"BlockPool {self.name!r}: double free of block {block_id}")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                num_freed += 1
        return num_freed

    def reset_cache(self) -> int:
        """Forget every cached hash (held blocks keep their content and owners). Returns how
        many hashes were dropped."""
        dropped = len(self._cached)
        for block_id in self._cached.values():
            self._hash_of[block_id] = None
        self._cached.clear()
        return dropped

    def __repr__(self) -> str:
        return (f"BlockPool({self.name!r}, free={self.num_free_blocks}/"
                f"{self.num_usable_blocks}, cached={self.num_cached_blocks})")
