"""LaunchPlan: which ranks this process starts or is, on which node, meeting where.

Three ways to start a world of tp x dp ranks (SGLang's flags, and torchrun's environment):

- one node (the default): this process is rank 0 (the driver, with the scheduler and the API
  server) and spawns ranks 1..N-1; they meet at a TCP store on 127.0.0.1, any free port;
- several nodes: `--nnodes K --node-rank i --dist-init-addr HOST:PORT` on every node, the same
  engine flags everywhere. Node i holds ranks [i * N/K, (i + 1) * N/K). Node 0 hosts the store
  at HOST:PORT and runs the driver; every other node only runs workers (no API server) until the
  driver stops them;
- under `torchrun`: each process is the one rank that RANK says; the store is torchrun's
  (MASTER_ADDR:MASTER_PORT, served by its agent, or by rank 0 when the agent does not share it).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4 import env as dsv4_env

__all__ = ["LaunchPlan", "LaunchError"]


class LaunchError(ValueError):
    """Launch flags or a torchrun environment that do not describe a world dsv4 can start."""


@dataclass(frozen=True)
class LaunchPlan:
    world_size: int
    nnodes: int = 1
    node_rank: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (one node only)
    torchrun_rank: int | None = None  # under torchrun: the one rank this process is
    local_rank: int | None = None  # under torchrun: its LOCAL_RANK (GPU index on its node)
    host_store: bool = True  # this process serves the store

    @classmethod
    def create(cls, world_size: int, nnodes: int = 1, node_rank: int = 0,
               dist_init_addr: str | None = None,
               environ: dict[str, str] | None = None) -> LaunchPlan:
        """environ: torchrun's variables (default: this process's, from dsv4.env)."""
        env = dsv4_env.torchrun() if environ is None else environ
        if "TORCHELASTIC_RUN_ID" in env:  # set by torchrun for every process it starts
            return cls._torchrun(world_size, env)
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise LaunchError(f"--node-rank {node_rank} is outside --nnodes {nnodes}")
        if world_size % nnodes:
            raise LaunchError(
                f"{world_size} ranks (tensor_parallel_size x data_parallel_size) do not split "
                f"evenly over --nnodes {nnodes}")
        if nnodes == 1 and dist_init_addr is None:
            return cls(world_size)
        if dist_init_addr is None:
            raise LaunchError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, "
                              "the same on every node)")
        host, _, port = dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise LaunchError(f"--dist-init-addr must be HOST:PORT, got {dist_init_addr!r}")
        return cls(world_size, nnodes, node_rank, host.strip("[]"), int(port),
                   host_store=node_rank == 0)

    @classmethod
    def _torchrun(cls, world_size: int, env) -> LaunchPlan:
        size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        if size != world_size:
            raise LaunchError(
                f"torchrun started WORLD_SIZE={size} processes but tensor_parallel_size x "
                f"data_parallel_size = {world_size}")
        local = int(env.get("LOCAL_WORLD_SIZE", size))
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return cls(world_size, max(1, size // local), rank // local, env["MASTER_ADDR"],
                   int(env["MASTER_PORT"]), torchrun_rank=rank,
                   local_rank=int(env.get("LOCAL_RANK", rank % local)),
                   host_store=rank == 0 and not agent)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def is_driver_node(self) -> bool:
        if self.torchrun_rank is not None:
            return self.torchrun_rank == 0
        return self.node_rank == 0

    def local_ranks(self) -> list[int]:
        """The ranks this process runs or spawns."""
        if self.torchrun_rank is not None:
            return [self.torchrun_rank]
        first = self.node_rank * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))
