"""How much memory the KV cache gets: what it can use, capped by what the device can give.

The cache never takes more than ``max_num_seqs`` sequences of ``max_model_len`` tokens can use
(``BlockManager.memory_needed``). What the device can give:

- CUDA (as vLLM's ``--gpu-memory-utilization``): ``utilization x total device memory``, minus
  what is in use after loading the weights, minus the activation peak of one profiled forward
  over ``max_num_batched_tokens`` tokens.
- CPU: ``utilization x MemAvailable`` after loading. A forward is profiled (peak resident set
  growth) only when the need-based cap does not fit that share, i.e. only when memory is what
  binds; a small model on a roomy machine starts without it.

``kv_cache_memory`` (bytes) overrides all of this.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

import torch

__all__ = ["available_memory", "kv_cache_budget", "profile_forward_peak"]

logger = logging.getLogger(__name__)


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def available_memory(device: torch.device) -> int:
    """Bytes that may still be given out: CUDA free memory, CPU MemAvailable (2 GiB when the
    platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo("MemAvailable") or (2 << 30)


def profile_forward_peak(forward: Callable[[], object], device: torch.device) -> int:
    """Peak bytes a forward adds on top of what is allocated now (CUDA: the allocator's peak;
    CPU: growth of the process's peak resident set, an upper bound when an earlier peak such as
    loading was higher)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    before = _rss()
    forward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return max(0, peak - before)


def kv_cache_budget(device: torch.device, needed: int, utilization: float,
                    profile: Callable[[], int], always_profile: bool = False) -> int:
    """The KV-cache byte budget (see the module docstring); ``profile()`` returns a forward's
    activation peak and is called only when needed (or always: the ranks of a multi-process
    engine must all run the profiling forward, whose collectives meet)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = profile()
        share = int(total * utilization) - (total - free) - peak
        logger.info("memory: %.2f GiB total x %.2f, %.2f GiB in use after load, %.2f GiB "
                    "activation peak -> %.2f GiB for the KV cache (it can use %.2f GiB)",
                    total / 2**30, utilization, (total - free) / 2**30, peak / 2**30,
                    max(share, 0) / 2**30, needed / 2**30)
    else:
        available = available_memory(device)
        share = int(available * utilization)
        if needed > share or always_profile:
            peak = profile()
            share -= peak
            logger.info("memory: %.2f GiB available x %.2f, %.2f GiB activation peak -> %.2f "
                        "GiB for the KV cache (it could use %.2f GiB)", available / 2**30,
                        utilization, peak / 2**30, max(share, 0) / 2**30, needed / 2**30)
    if share <= 0:
        raise ValueError(f"no memory left for the KV cache on {device} (utilization "
                         f"{utilization}); raise the utilization, lower max_num_batched_tokens "
                         "or set kv_cache_memory")
    return min(needed, share)
