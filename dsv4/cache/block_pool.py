"""BlockPool: a fixed number of equally sized blocks of one cache kind, as integer ids.

Invariants: block 0 is the null block (never handed out; padding lanes and unused table slots
point at it); every other block is either on the free queue with ref count 0 or held with ref
count >= 1; ``allocate`` is all-or-nothing. Each block has a ``block_hash`` slot (always None
today) so prefix caching can later keep freed-but-hashed blocks on the free queue as evictable
hits, as in nano-vllm / vLLM. Pure Python: the pool owns ids, never memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["BlockPool", "NULL_BLOCK_ID"]

NULL_BLOCK_ID = 0


class BlockPool:
    """Free queue + ref counts over ``num_blocks`` block ids (id 0 reserved as null block)."""

    def __init__(self, num_blocks: int, name: str = "") -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool {name!r}: num_blocks must be >= 1 (the null block)")
        self.name = name
        self.num_blocks = num_blocks  # including the null block
        self.ref_counts: list[int] = [0] * num_blocks
        # FIFO: freed blocks go to the back, so the most recently freed are reused last (what
        # a prefix cache will want when it looks freed blocks up by hash)
        self._free: deque[int] = deque(range(1, num_blocks))

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks currently held (0.0 .. 1.0)."""
        usable = self.num_usable_blocks
        return 0.0 if usable == 0 else 1.0 - self.num_free_blocks / usable

    def ref_count(self, block_id: int) -> int:
        return self.ref_counts[block_id]

    # ---- mutation --------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out ``num_blocks`` blocks with ref count 1; raises if too few are free."""
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if num_blocks > len(self._free):
            raise RuntimeError(
                f"BlockPool {self.name!r}: {num_blocks} blocks asked, {len(self._free)} free"
            )
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self.ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share already held blocks (prefix hits, forked requests)."""
        for block_id in block_ids:
            if block_id == NULL_BLOCK_ID or self.ref_counts[block_id] < 1:
                raise RuntimeError(f"BlockPool {self.name!r}: incref of free block {block_id}")
            self.ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> int:
        """Drop one reference to each block; blocks reaching 0 go back to the free queue.
        Returns how many blocks became free."""
        num_freed = 0
        for block_id in block_ids:
            if block_id == NULL_BLOCK_ID:
                continue
            count = self.ref_counts[block_id]
            if count < 1:
                raise RuntimeError(f"BlockPool {self.name!r}: double free of block {block_id}")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)
                num_freed += 1
        return num_freed

    def __repr__(self) -> str:
        return (f"BlockPool({self.name!r}, free={self.num_free_blocks}/"
                f"{self.num_usable_blocks})")
