"""ParallelContext: one rank's place in a ParallelConfig, with the groups it talks over.

The model is built with one (a single-process model gets `ParallelContext.single()`, whose groups
have one rank and do nothing): `tp` splits attention, embedding and head; `moe` (all ranks)
splits the routed experts; `dp` joins the data-parallel groups' tokens before an MoE layer when
data_parallel_size > 1. `control` is a gloo group over all ranks for the driver's messages to
its workers, also when the tensors go over NCCL.

`begin_step(input_ids)` is called once per forward: under DP-attention it learns how many tokens
every data-parallel group brings this step and their ids (two small all-gathers), which the MoE
layers need to join their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv4.distributed.comm import DEFAULT_TIMEOUT, Comm, new_group
from dsv4.distributed.parallel_config import ParallelConfig

__all__ = ["ParallelContext"]

_IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class ParallelContext:
    config: ParallelConfig = field(default_factory=ParallelConfig)
    rank: int = 0
    tp: Comm = field(default_factory=Comm)
    dp: Comm = field(default_factory=Comm)
    moe: Comm = field(default_factory=Comm)
    control: Comm = field(default_factory=Comm)
    # DP-attention, set by begin_step: tokens each data-parallel group brings to the step, and
    # all groups' token ids (padded layout, see begin_step)
    dp_num_tokens: list[int] = field(default_factory=list)
    dp_input_ids: torch.Tensor | None = None
    timeout: timedelta = DEFAULT_TIMEOUT  # of the model's collectives

    @classmethod
    def single(cls) -> ParallelContext:
        return cls()

    @classmethod
    def build(cls, config: ParallelConfig, rank: int, store: dist.Store,
              backend: str = "gloo", timeout: timedelta = DEFAULT_TIMEOUT) -> ParallelContext:
        """Every rank of the world calls this with the same config and store. `timeout` bounds
        every collective of the model; the control group waits without a practical limit (an
        idle server sends its workers nothing for hours)."""
        if not 0 <= rank < config.world_size:
            raise ValueError(f"rank {rank} is outside the world of {config.world_size} ranks")
        world = list(range(config.world_size))
        tp = config.tp_group(rank)
        dp = config.dp_group(rank)
        # the control group first: building it waits for every rank without a practical limit,
        # so the others (built with `timeout`) start with all ranks present
        control = new_group(store, "control", world, rank, "gloo", _IDLE_TIMEOUT)
        return cls(config, rank,
                   tp=new_group(store, f"tp{tp[0]}", tp, rank, backend, timeout),
                   dp=new_group(store, f"dp{dp[0]}", dp, rank, backend, timeout),
                   moe=new_group(store, "moe", world, rank, backend, timeout),
                   control=control, timeout=timeout)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def local_experts(self, n_experts: int) -> tuple[range, int, int]:
        """(global ids of the routed experts this rank holds weights of, parts each expert's
        width is cut into, this rank's part)."""
        group, part = self.config.expert_place(self.rank)
        per = n_experts // self.config.expert_parallel_size
        return (range(group * per, (group + 1) * per), self.config.expert_tensor_parallel_size,
                part)

    def begin_step(self, input_ids: torch.Tensor) -> None:
        """Called once per forward with the step's flat token ids [N]. Under DP-attention: learn
        every data-parallel group's token count and gather all groups' ids (hash routing needs
        them), in the padded layout the MoE layers use: group g's tokens at rows
        [g * M, g * M + n_g), M the largest count."""
        if self.dp.size == 1:
            return
        n = torch.tensor([input_ids.numel()], dtype=torch.long, device=input_ids.device)
        self.dp_num_tokens = self.dp.all_gather(n).tolist()
        self.dp_input_ids = self.dp.all_gather(self._pad(input_ids.reshape(-1)))

    @property
    def dp_max_tokens(self) -> int:
        return max(self.dp_num_tokens)

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        extra = self.dp_max_tokens - t.shape[0]
        if extra == 0:
            return t
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    def dp_gather(self, x: torch.Tensor) -> torch.Tensor:
        """This group's rows x [n, ...] -> all groups' rows in the padded layout [dp * M, ...]."""
        return self.dp.all_gather(self._pad(x))

    def dp_rows_of(self, group: int) -> slice:
        m = self.dp_max_tokens
        return slice(group * m, group * m + self.dp_num_tokens[group])

    def collective_counts(self) -> dict[str, int]:
        """Collectives issued so far on the model's groups ("tp.all_reduce": 12, ...); control
        messages are not counted here."""
        return {f"{label}.{kind}": n
                for label, comm in (("tp", self.tp), ("dp", self.dp), ("moe", self.moe))
                for kind, n in sorted(comm.counts.items())}

    def reset_counts(self) -> None:
        for comm in (self.tp, self.dp, self.moe):
            comm.counts.clear()
