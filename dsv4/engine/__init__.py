"""The engine core: requests, scheduling, batches and sampling.

The pure-Python parts (EngineConfig, Request, ScheduledBatch, Scheduler) are exported here and
import no torch themselves; the torch Sampler is imported from ``dsv4.engine.sampler``.
"""

from __future__ import annotations

from dsv4.engine.batch import ScheduledBatch
from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.request import Request, RequestStatus, StepOutput
from dsv4.engine.scheduler import Scheduler

__all__ = [
    "EngineConfig",
    "Request",
    "StepOutput",
    "RequestStatus",
    "ScheduledBatch",
    "Scheduler",
]
