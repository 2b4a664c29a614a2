"""Block hashes for prefix caching: one digest per full block, chained over the whole prefix.

Hash j names the content of logical block j of a sequence: the token ids of blocks 0..j and a
seed for everything else that changes what the cache holds for them (the model, the cache and
state dtypes, the QAT rounding switch). Equal hashes mean equal cache content in every kind, so
one hash serves the swa, csa and hca pools alike. SHA-256 keeps collisions out of reach (a
collision would silently hand one request another's cache); hashing a 256-token block costs a
few microseconds.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

__all__ = ["extend_block_hashes", "hash_seed"]


def hash_seed(*parts: object) -> bytes:
    """The digest that starts every chain, from whatever identifies the cache's content."""
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()


def extend_block_hashes(hashes: list[bytes], seed: bytes, token_ids: Sequence[int],
                        block_size: int) -> list[bytes]:
    """Append the hashes of the full blocks of ``token_ids`` that ``hashes`` lacks (in place;
    returns ``hashes``). Earlier hashes are taken as given, so a growing sequence is hashed once."""
    parent = hashes[-1] if hashes else seed
    for j in range(len(hashes), len(token_ids) // block_size):
        block = array("q", token_ids[j * block_size:(j + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)
    return hashes
