"""The ranks of a multi-process engine: what each one loads, and the worker's step loop.

Rank 0, the driver, lives in the process of the API server and the scheduler; ranks 1.. are
worker processes (`dsv4.engine.executor` starts them). Every rank loads its own part of the
checkpoint (`load_rank`), builds the same KV-cache plan (the smallest budget any rank can afford)
and a ModelRunner. Each step the driver sends one ScheduledBatch per data-parallel group over the
control group; every rank runs its group's batch (an empty one still joins the MoE collectives),
so the collectives inside the model meet. The ranks of a tensor-parallel group compute the same
logits (the head's all-gather) and sample alike; the driver keeps the tokens of each group's
first rank (its own for group 0, gathered for the others), and the next step's batches carry
them."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv4.cache.block_manager import BlockManager
from dsv4.distributed import ParallelConfig, ParallelContext
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.model_runner import ModelRunner, StepResult
from dsv4.engine.sampler import LogprobsTensors, SamplerOutput
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM

__all__ = ["RankSpec", "load_rank", "open_store", "worker_main", "STOP"]

logger = logging.getLogger(__name__)

STOP = "stop"  # the control message that ends a worker's loop
_STORE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to join the world (picklable: it crosses into spawned workers)."""

    engine_args: object  # dsv4.engine_args.EngineArgs (kept untyped: that module is above)
    parallel: ParallelConfig
    host: str
    port: int
    timeout_s: float
    nodes: int = 1
    local_rank_of: int | None = None  # under torchrun: LOCAL_RANK of this process

    @property
    def ranks_per_node(self) -> int:
        return self.parallel.world_size // self.nodes

    @property
    def device_type(self) -> str:
        """cuda or cpu (no --device: cuda where torch sees a GPU, as for one process)."""
        device = self.engine_args.device
        if device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if str(device).startswith("cuda") else "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


def _device(spec: RankSpec, rank: int) -> str:
    """This rank's device: its own GPU on its node (by local rank), or the CPU, whose cores the
    node's ranks share (each takes its part for its torch threads, instead of all of them)."""
    if spec.device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.ranks_per_node))
        return "cpu"
    local = rank % spec.ranks_per_node if spec.local_rank_of is None else spec.local_rank_of
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def load_rank(spec: RankSpec, rank: int, store: dist.Store, progress: bool = False
              ) -> tuple[DeepseekV4ForCausalLM, EngineConfig]:
    """Join the groups, load this rank's part of the model, agree on the cache plan."""
    from dsv4.model.loader import load_model

    args = spec.engine_args
    device = _device(spec, rank)
    ctx = ParallelContext.build(spec.parallel, rank, store, spec.backend,
                                timedelta(seconds=spec.timeout_s))
    model = load_model(args.model_path(), device=device, dtype=args.torch_dtype,
                       emulate_quant=args.emulate_quant, progress=progress, parallel=ctx,
                       ops=args.ops)
    # ranks finish loading minutes apart (disks, nodes): meet first on the control group, which
    # has no practical timeout, before the first collective that has one
    ctx.control.barrier()
    sharers = spec.ranks_per_node if spec.device_type == "cpu" else 1  # the node's RAM
    config = args.create_engine_config(model, sharers)  # a profiled forward on every rank
    budgets = ctx.control.all_gather(torch.tensor([config.kv_cache_memory], dtype=torch.long))
    return model, config.replace(kv_cache_memory=int(budgets.min()))


def open_store(spec: RankSpec, is_master: bool) -> dist.TCPStore:
    """The rendezvous store. Its timeout is long: other nodes may start minutes apart, and a
    rank that cannot reach it at all still fails (after an hour) rather than never."""
    return dist.TCPStore(spec.host, spec.port, spec.parallel.world_size, is_master=is_master,
                         timeout=_STORE_TIMEOUT, wait_for_workers=False)


def _exit_with_parent() -> None:
    """A worker whose driver is gone (killed, crashed) ends itself: nothing else would."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="dsv4-parent-watch", daemon=True).start()


def _on_cpu(result: StepResult) -> StepResult:
    """A step's result with its tensors on the CPU (unpickled in the driver, a GPU tensor would
    open a CUDA context on this rank's GPU there)."""
    sampled, out, prompt_lps, drafts = result

    def cpu(t: LogprobsTensors | None) -> LogprobsTensors | None:
        return None if t is None else LogprobsTensors(
            *(getattr(t, f.name).cpu() for f in dataclasses.fields(t)))

    if out is not None:
        out = SamplerOutput(out.sampled_token_ids.cpu(), cpu(out.logprobs))
    prompt_lps = {rid: (start, cpu(t)) for rid, (start, t) in prompt_lps.items()}
    return StepResult(sampled, out, prompt_lps, drafts)


def worker_main(spec: RankSpec, rank: int, spawned: bool = True) -> None:
    """A worker: load, then run the driver's batches until told to stop. `spawned`: a process
    that dsv4 started, which ends itself when its parent is gone."""
    if spawned:
        _exit_with_parent()
    logging.basicConfig(level=logging.WARNING, format=f"dsv4 rank {rank}: %(message)s")
    model, config = load_rank(spec, rank, open_store(spec, is_master=False))
    runner = ModelRunner(model, BlockManager.from_config(model.config, config),
                         config.kv_cache_dtype, config.index_cache_dtype,
                         config.compressor_state_dtype, config.num_speculative_tokens,
                         config.compile_decode)
    parallel = model.parallel
    group = spec.parallel.dp_rank(rank)
    while True:
        batches = parallel.control.broadcast_object(None)
        if batches == STOP:
            return
        result = runner.execute(batches[group])
        if len(batches) > 1:  # the driver collects every group's tokens, as CPU tensors
            parallel.control.all_gather_object(_on_cpu(result), timeout=parallel.timeout)
