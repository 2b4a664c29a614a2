"""Workers: the driver's side of a multi-process engine (tensor, expert, data parallelism).

`start_workers` spawns the other ranks of the driver's node as processes (spawn, not fork: a
forked CUDA or thread state is unsafe), opens the rendezvous store (see LaunchPlan) and returns
once the driver has its own part of the model; `run_worker_node` runs the ranks of a node
without the driver. `run_step` sends each step's batches and collects the groups' results.

A monitor thread watches the processes: a worker that exits is reported by `failure()` at once
(the server's /health turns 503), and the driver's next collective fails instead of waiting
(gloo notices the closed connection; a hung worker meets the collective timeout). `shutdown()`
asks the workers to stop, then terminates and kills whatever is left, so no process outlives
the engine.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import wait

import torch.distributed as dist

from dsv4.config import ModelConfig
from dsv4.distributed import ParallelConfig
from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.model_runner import ModelRunner, StepResult
from dsv4.engine.launch_plan import LaunchPlan
from dsv4.engine.outputs import WorkerDiedError
from dsv4.engine.worker import STOP, RankSpec, load_rank, open_store, worker_main
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM

__all__ = ["Workers", "WorkerDiedError", "start_workers", "run_worker_node", "free_port"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Workers:
    def __init__(self, processes: dict[int, mp.Process], spec: RankSpec) -> None:
        self.processes, self.spec = processes, spec
        self._failure: str | None = None
        self._stopping = False
        self.control = None  # the driver's control group, once loaded
        self.store: dist.Store | None = None  # kept as long as the engine: the ranks' store
        self._monitor = threading.Thread(target=self._watch, name="dsv4-workers", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit handler

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in self.processes.items()}
        while sentinels and not self._stopping:
            for ready in wait(list(sentinels), timeout=1.0):
                rank = sentinels.pop(ready)
                if not self._stopping:
                    self.processes[rank].join(1.0)
                    code = self.processes[rank].exitcode
                    self._failure = f"worker rank {rank} exited with code {code}"
                    logger.error("%s; the engine cannot serve any more requests",
                                 self._failure)

    def run_step(self, runner: ModelRunner, batches: list[ScheduledBatch]) -> list[StepResult]:
        """One step of every data-parallel group: send all groups' batches to every rank, run
        group 0's here, and collect each group's result from its first tensor-parallel rank."""
        parallel = runner.model.parallel
        self.control.broadcast_object(batches, timeout=parallel.timeout)
        own = runner.execute(batches[0])
        if len(batches) == 1:
            return [own]
        gathered = self.control.all_gather_object(own, timeout=parallel.timeout)
        tp = parallel.config.tensor_parallel_size
        return [gathered[g * tp] for g in range(len(batches))]

    def failure(self) -> str | None:
        """Why the engine cannot go on (a worker died), or None while all are running."""
        return self._failure

    def explain(self, exc: BaseException) -> WorkerDiedError:
        """The error to raise for a collective that failed under `exc`. A dead worker breaks
        the collective before the monitor has seen its exit: give the monitor a moment to name
        the rank."""
        deadline = time.monotonic() + 1.5
        while self._failure is None and time.monotonic() < deadline \
                and self._monitor.is_alive():
            time.sleep(0.02)
        reason = self._failure or (
            f"a step failed across ranks (a collective broke or waited past --dist-timeout "
            f"{self.spec.timeout_s:.0f} s, or a rank raised), so the ranks are no longer in "
            f"step: {exc}")
        self._failure = reason
        return WorkerDiedError(reason)

    def shutdown(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Ask the workers to stop (graceful: a stop message, when no step is running and none
        has failed), then end whatever is left."""
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        # the monitor ends within its 1 s poll; after that only this thread reaps the processes
        # (two threads waiting on one child can each miss its exit)
        if threading.current_thread() is not self._monitor:
            self._monitor.join(2.0)
        if graceful and self.control is not None and self._failure is None:
            try:
                self.control.broadcast_object(STOP)
            except Exception:  # noqa: BLE001 - a broken group: the processes are ended below
                pass
        for p in self.processes.values():
            p.join(timeout if graceful else 0.5)
        for p in self.processes.values():
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()


def _spec(engine_args: object, parallel: ParallelConfig, plan: LaunchPlan, timeout_s: float
          ) -> RankSpec:
    path = str(engine_args.model_path())  # resolved once, here
    parallel.check(ModelConfig.from_pretrained(path))  # a bad layout fails before any spawn
    return RankSpec(replace(engine_args, model=path), parallel, plan.host,
                    plan.port or free_port(plan.host), timeout_s, plan.nnodes, plan.local_rank)


def _spawn(spec: RankSpec, ranks: list[int]) -> dict[int, mp.Process]:
    ctx = mp.get_context("spawn")  # not fork: forked CUDA or thread state is unsafe
    processes = {rank: ctx.Process(target=worker_main, args=(spec, rank), daemon=True,
                                   name=f"dsv4-rank{rank}") for rank in ranks}
    for p in processes.values():
        p.start()
    return processes


def start_workers(engine_args: object, parallel: ParallelConfig, plan: LaunchPlan,
                  timeout_s: float = 120.0, *, progress: bool = False
                  ) -> tuple[DeepseekV4ForCausalLM, EngineConfig, Workers]:
    """The driver (rank 0): spawn this node's other ranks, load the driver's part; returns
    (model, engine config, workers)."""
    spec = _spec(engine_args, parallel, plan, timeout_s)
    store = open_store(spec, plan.host_store)
    workers = Workers(_spawn(spec, [r for r in plan.local_ranks() if r != 0]), spec)
    try:
        model, config = load_rank(spec, 0, store, progress)
    except BaseException as exc:
        workers.shutdown(timeout=1.0)
        if workers.failure():
            raise WorkerDiedError(workers.failure()) from exc
        raise
    workers.control = model.parallel.control
    workers.store = store
    return model, config, workers


def run_worker_node(engine_args: object, parallel: ParallelConfig, plan: LaunchPlan,
                    timeout_s: float = 120.0) -> None:
    """A node (or torchrun process) without the driver: run its ranks until the driver stops
    them. The first runs in this process, the others are spawned."""
    spec = _spec(engine_args, parallel, plan, timeout_s)
    first, *others = plan.local_ranks()
    processes = _spawn(spec, others)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker_main(spec, first, spawned=False)
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    # the rank runs in a thread: the main thread stays in Python, so Ctrl-C and SIGTERM are
    # handled even while the rank waits in a collective
    thread = threading.Thread(target=run, name=f"dsv4-rank{first}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
        if errors:
            raise errors[0]
    finally:
        for p in processes.values():
            p.join(10.0)
            if p.is_alive():
                p.kill()
