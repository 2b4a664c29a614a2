"""Scale-out: the parallel layout, one rank's groups, and counted collectives."""

from dsv4.distributed.comm import Comm, new_group
from dsv4.distributed.parallel_config import ParallelConfig, ParallelLayoutError
from dsv4.distributed.parallel_context import ParallelContext

__all__ = ["Comm", "new_group", "ParallelConfig", "ParallelLayoutError", "ParallelContext"]
