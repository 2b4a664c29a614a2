"""Comm: the collectives of one process group, counted; `new_group` builds one from a store.

Groups are made directly from a key-value store (`torch.distributed.TCPStore` between processes,
`HashStore` between threads of one process, as the tests do), not through the global default
group, so several ranks can live in one process and every group is explicit. Gloo serves CPU
tensors, NCCL CUDA ones; the calls are the same. A Comm of size 1 does nothing and costs nothing,
so the model holds one in every layout.

Every collective is counted by name in `counts` (tests check how many each layer issues), with
the bytes this rank puts in in `bytes` (benchmarks/parallel.py), and waits at most the group's
timeout: a rank that died makes the others raise instead of hang.
"""

from __future__ import annotations

import pickle
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

__all__ = ["Comm", "new_group", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(seconds=120)


class Comm:
    def __init__(self, group: dist.ProcessGroup | None = None, rank: int = 0, size: int = 1,
                 name: str = "single") -> None:
        if size > 1 and group is None:
            raise ValueError("a Comm of more than one rank needs a process group")
        self.group, self.rank, self.size, self.name = group, rank, size, name
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()  # payload bytes this rank put in, by kind

    def __repr__(self) -> str:
        return f"Comm({self.name!r}, rank {self.rank} of {self.size})"

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.counts[kind] += 1
        self.bytes[kind] += t.numel() * t.element_size()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group; returns a new tensor (t is left alone)."""
        if self.size == 1:
            return t
        self._count("all_reduce", t)
        out = t.contiguous().clone()
        self.group.allreduce([out]).wait()
        return out

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's t (same shape on all) concatenated along dim in rank order."""
        if self.size == 1:
            return t
        self._count("all_gather", t)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.group.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """t [size * M, ...] summed over the group; rank r gets rows [r * M, (r + 1) * M)."""
        if self.size == 1:
            return t
        self._count("reduce_scatter", t)
        chunks = list(t.contiguous().chunk(self.size))
        out = torch.empty_like(chunks[0])
        self.group.reduce_scatter([out], [chunks]).wait()
        return out

    def broadcast_object(self, obj: object = None, src: int = 0,
                         timeout: timedelta | None = None) -> object:
        """Pickle obj on rank `src` and hand it to every rank (control messages between dsv4's
        own processes only; never used on data from outside). `timeout` overrides the group's
        (gloo groups only)."""
        if self.size == 1:
            return obj
        self.counts["broadcast"] += 1
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.group.broadcast(size, src, timeout).wait()
        if self.rank != src:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.group.broadcast(data, src, timeout).wait()
        return obj if self.rank == src else pickle.loads(data.numpy().tobytes())

    def all_gather_object(self, obj: object, timeout: timedelta | None = None) -> list[object]:
        """Every rank's obj, in rank order (pickled; dsv4's own processes only)."""
        if self.size == 1:
            return [obj]
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.size)]
        opts = AllgatherOptions()
        if timeout is not None:
            opts.timeout = timeout
        self.group.allgather([sizes], [torch.tensor([data.numel()])], opts).wait()
        longest = max(int(n.item()) for n in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
        self.counts["all_gather_object"] += 1
        self.group.allgather([parts], [padded], opts).wait()
        return [pickle.loads(part[:int(n.item())].numpy().tobytes())
                for part, n in zip(parts, sizes)]

    def barrier(self) -> None:
        if self.size > 1:
            self.all_reduce(torch.zeros(1))


def new_group(store: dist.Store, name: str, ranks: list[int], rank: int,
              backend: str = "gloo", timeout: timedelta = DEFAULT_TIMEOUT) -> Comm:
    """The group of world ranks `ranks` as seen from world rank `rank` (which must be in it).
    Every member calls this with the same name and ranks."""
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not in group {name} {ranks}")
    if len(ranks) == 1:
        return Comm(name=name)
    local, size = ranks.index(rank), len(ranks)
    prefixed = dist.PrefixStore(f"dsv4/{name}", store)
    if backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, local, size, timeout)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, local, size, options)
    else:
        raise ValueError(f"unknown backend {backend!r} (gloo or nccl)")
    return Comm(group, local, size, name)
