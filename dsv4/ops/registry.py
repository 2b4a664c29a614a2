"""The op registry: which implementation (torch or Triton) runs each hot op of the model.

Every op has its torch implementation (the model's own code: the reference, and the fallback
everywhere) and, where one is written, a Triton kernel in dsv4.kernels. The choice is made once
when a model is loaded (`configure(device, spec)`): on CUDA with triton importable an op runs its
Triton kernel where one exists and the GPU's compute capability suffices, on every other device
torch. `spec` (the engine's ``--ops``, else
$DSV4_OPS) forces single ops, e.g. "rms_norm=torch,sparse_attention=triton" ("all=torch" sets
every op). Forcing Triton on a CPU device is allowed only under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests drive the model through the kernels.

Call sites use `OPS.<name>(...)`. Implementations are named by "module:function" strings and
imported on first use, so the registry imports neither the model nor triton (and has no import
cycle with the model modules that call it). The process-wide table is fine for dsv4's layout:
one process drives one device.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsv4 import env

__all__ = [
    "BACKENDS",
    "OPS",
    "SPECS",
    "OpSpec",
    "configure",
    "parse_spec",
    "resolve",
    "triton_available",
]

_log = logging.getLogger("dsv4.ops")
BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class OpSpec:
    name: str
    torch: str  # "module:function" of the reference implementation
    triton: str | None  # "module:function" of the Triton kernel's wrapper, if one is written
    # the CUDA compute capability the kernel needs: bf16 dots from Ampere (8.0); the hardware
    # e4m3 cast of the FP8 linear from Ada / Hopper (8.9)
    capability: tuple[int, int] = (8, 0)


SPECS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("rms_norm", "dsv4.model.layers:rms_norm", "dsv4.kernels.rms_norm:rms_norm"),
    OpSpec("rope", "dsv4.model.layers:apply_rope", "dsv4.kernels.rope:apply_rope"),
    OpSpec("kv_quant", "dsv4.quant:fake_quant_kv", "dsv4.kernels.kv_cache:fake_quant_kv"),
    OpSpec("kv_write", "dsv4.cache.kv_format:write_entries",
           "dsv4.kernels.kv_cache:write_entries"),
    OpSpec("window_pool", "dsv4.model.compressor:window_pool",
           "dsv4.kernels.window_pool:window_pool"),
    OpSpec("hc_pre", "dsv4.model.mhc:hc_pre", "dsv4.kernels.mhc:hc_pre"),
    OpSpec("hc_post", "dsv4.model.mhc:hc_post", "dsv4.kernels.mhc:hc_post"),
    OpSpec("sparse_attention", "dsv4.model.attention:sparse_attention",
           "dsv4.kernels.sparse_attention:sparse_attention"),
    OpSpec("indexer_scores", "dsv4.model.indexer:indexer_scores",
           "dsv4.kernels.indexer:indexer_scores"),
    OpSpec("indexer_topk", "dsv4.model.indexer:select_topk", "dsv4.kernels.indexer:select_topk"),
    OpSpec("moe_experts", "dsv4.model.moe:routed_experts", "dsv4.kernels.moe:routed_experts"),
    OpSpec("fp8_linear", "dsv4.model.linear:fp8_linear", "dsv4.kernels.fp8_linear:fp8_linear",
           (8, 9)),
)}


def _load(path: str) -> Callable[..., Any]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def parse_spec(spec: str | None) -> dict[str, str]:
    """"name=backend,..." -> {name: backend}; ValueError naming a bad op or backend."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, backend = (s.strip() for s in item.partition("="))
        if not sep or backend not in (*BACKENDS, "auto"):
            raise ValueError(f"ops: {item!r} is not NAME=BACKEND with BACKEND one of torch, "
                             f"triton, auto")
        if name != "all" and name not in SPECS:
            raise ValueError(f"ops: unknown op {name!r} (known: all, {', '.join(SPECS)})")
        if name == "all":
            out.update({n: backend for n in SPECS})
        else:
            out[name] = backend
    return out


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability (None: not a usable CUDA device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def resolve(device: torch.device | str, spec: str | None = None,
            capability: tuple[int, int] | None = None) -> dict[str, str]:
    """The backend of every op on `device` with `spec`'s choices (None: $DSV4_OPS) forced;
    `capability` overrides the device's (tests)."""
    device = torch.device(device)
    forced = parse_spec(env.ops_overrides() if spec is None else spec)
    have_triton = triton_available()
    cap = capability or _capability(device)
    table = {}
    for name, op in SPECS.items():
        want = forced.get(name, "auto")
        fits = have_triton and cap is not None and cap >= op.capability
        if want == "auto":
            table[name] = "triton" if fits and op.triton else "torch"
            continue
        if want == "triton":
            if op.triton is None:
                raise ValueError(f"ops: {name} has no Triton kernel (only torch)")
            if not have_triton:
                raise ValueError(f"ops: {name}=triton, but triton is not installed")
            if device.type != "cuda" and not env.triton_interpret():
                raise ValueError(f"ops: {name}=triton needs a CUDA device (or Triton's CPU "
                                 f"interpreter, TRITON_INTERPRET=1), not {device.type}")
            if device.type == "cuda" and cap is not None and cap < op.capability:
                raise ValueError(f"ops: {name}=triton needs compute capability "
                                 f"{op.capability[0]}.{op.capability[1]}, this GPU has "
                                 f"{cap[0]}.{cap[1]}")
        table[name] = want
    return table


class _OpTable:
    """OPS.<op>(...) calls the chosen implementation; resolved on first use, cached as an
    instance attribute so a call costs one attribute lookup."""

    def __init__(self) -> None:
        self.choices = {name: "torch" for name in SPECS}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = SPECS.get(name)
        if op is None:
            raise AttributeError(name)
        fn = _load(op.triton if self.choices[name] == "triton" else op.torch)
        setattr(self, name, fn)
        return fn

    def triton(self, name: str) -> bool:
        """Whether op `name` runs its Triton kernel (for call sites that hand it another input
        form, such as cache slots instead of gathered keys)."""
        return self.choices[name] == "triton"

    def set(self, choices: dict[str, str]) -> None:
        for name in SPECS:
            self.__dict__.pop(name, None)
        self.choices = {**{name: "torch" for name in SPECS}, **choices}


OPS = _OpTable()


def configure(device: torch.device | str, spec: str | None = None) -> dict[str, str]:
    """Choose every op's backend for `device` (see the module doc), log the table, return it."""
    table = resolve(device, spec)
    OPS.set(table)
    _log.info("ops on %s: %s", torch.device(device).type,
              ", ".join(f"{k}={v}" for k, v in table.items()))
    return table
