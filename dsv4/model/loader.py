"""load_model: a V4 checkpoint directory -> DeepseekV4ForCausalLM, weights in checkpoint precision.

Reads only safetensors (sharded via model.safetensors.index.json, or one model.safetensors) and
config.json; never pickles, never code from the checkpoint directory. The model is built on the
meta device and each parameter is materialised straight from its stored tensor, so FP8 / FP4
weights stay FP8 / FP4 in memory. Missing, unexpected or mis-shaped tensors fail with the name
and the expected shape.

With a ParallelContext the model is one rank's part, and the loader reads only that part: a split
tensor through `safe_open(...).get_slice` (just its rows or columns, FP8/FP4 bytes as stored),
another rank's routed experts not at all. transformers-named checkpoints (the test oracle's
format, with experts merged into 3-D tensors) are read whole and then cut.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from dsv4.config import ModelConfig
from dsv4.device import resolve_device
from dsv4.distributed.parallel_context import ParallelContext
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.model.linear import Linear, Shard
from dsv4.model.names import is_hf_naming, official_items, released_in_fp32
from dsv4.ops import configure as configure_ops

logger = logging.getLogger(__name__)

__all__ = ["load_model", "checkpoint_files", "CheckpointError"]

_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32, torch.uint8)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config."""


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def load_model(path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, emulate_quant: bool = True,
               progress: bool = True, parallel: ParallelContext | None = None,
               ops: str | None = None) -> DeepseekV4ForCausalLM:
    """Load a checkpoint (official or transformers naming).

    device: "cpu" (fp32 compute) or "cuda" (bf16 compute); default: cuda when available. A
    device this machine cannot provide raises dsv4.device.DeviceError (a ValueError).
    dtype: expand every weight to this dtype at load (more memory, no per-matmul dequant);
    None keeps FP8/FP4 weights and the embedding as stored, and casts the unquantized
    projections and the head to the compute dtype once. emulate_quant: the reference's
    FP8/FP4 KV and indexer rounding. parallel: load this rank's part only (the layout is checked
    against the config first). ops: per-op backend choices ("rms_norm=torch,..."; None:
    $DSV4_OPS), resolved for `device` by dsv4.ops and logged.
    """
    device = resolve_device(device)  # first: a CUDA request without CUDA fails before any I/O
    configure_ops(device, ops)  # a bad --ops fails before any I/O too
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    parallel = parallel or ParallelContext.single()
    parallel.config.check(config)
    files = checkpoint_files(path)
    names = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    hf = is_hf_naming(names)
    # the -0731 releases' DSpark drafter is not supported yet: run the trunk, skip its tensors
    dspark = config.drafter == "dspark"
    with_mtp = not dspark and any(n.startswith("mtp.") for n in names)
    skipped = 0
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config, emulate_quant=emulate_quant, with_mtp=with_mtp,
                                      parallel=parallel)
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    loaded: set[str] = set()
    bar = tqdm(total=len(names), desc="Loading weights", unit="tensor", disable=not progress)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for stored in f.keys():
                # official names are read lazily (None): only this rank's part, and nothing of
                # another rank's experts; transformers' merged tensors have to be read whole
                items = (official_items(stored, f.get_tensor(stored), hf) if hf
                         else [(stored, None)])
                for name, tensor in items:
                    if name not in expected:
                        if _other_ranks_expert(name, config.n_routed_experts):
                            continue
                        if dspark and _is_drafter_tensor(name):
                            skipped += 1
                            continue
                        shape = tuple(tensor.shape if tensor is not None
                                      else f.get_slice(stored).get_shape())
                        raise CheckpointError(f"unexpected tensor {name} {shape} in checkpoint")
                    shard = _shard_of(model, name)
                    tensor = (_read_part(f, name, shard) if tensor is None
                              else _take(tensor, shard))
                    _assign(model, expected, name, tensor, device)
                    loaded.add(name)
                bar.update(1)
    bar.close()
    if dspark:
        logger.warning("%s drafts with DSpark (dspark_* keys in config.json), which dsv4 does "
                       "not support yet: the trunk is loaded and runs without speculative "
                       "decoding; %d drafter tensors were skipped", path, skipped)
    missing = [n for n in expected if n not in loaded]
    if missing:
        shown = ", ".join(f"{n} {tuple(expected[n].shape)}" for n in missing[:8])
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensors: {shown}"
                              + (" ..." if len(missing) > 8 else ""))
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    model.compute_dtype = dtype or compute
    for mod in model.modules():
        if isinstance(mod, Linear):
            if dtype is not None:
                mod.densify(dtype)
            elif mod.fmt == "dense":  # small bf16 projections: cast once, not per matmul
                mod.weight.data = mod.weight.data.to(model.compute_dtype)
    if dtype is not None:
        model.embed.weight.data = model.embed.weight.data.to(dtype)
    _prepare_head(model)
    return model.eval()


def _prepare_head(model: DeepseekV4ForCausalLM) -> None:
    """Give the head the compute dtype once (converting a bf16 head every step would cost more
    than the GEMV itself), laid out [vocab, dim] as stored: `head_matmul` reads it at memory
    speed on the CPU for the few rows of a decode or verify step."""
    w = model.head.weight
    model.head.weight = torch.nn.Parameter(w.data.to(model.compute_dtype).contiguous(),
                                           requires_grad=False)


_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def _is_drafter_tensor(name: str) -> bool:
    """A tensor of a draft module (MTP stages, DSpark) rather than of the trunk."""
    return name.startswith("mtp.") or "dspark" in name


def _other_ranks_expert(name: str, n_experts: int) -> bool:
    """A routed expert's tensor that another expert-parallel rank holds."""
    found = _EXPERT.search(name)
    return found is not None and int(found.group(1)) < n_experts


def _shard_of(model: torch.nn.Module, name: str) -> Shard | None:
    """The part of the stored tensor `name` (a name the model has) that this rank holds."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, "shards", {}).get(attr)


def _part(size: int, shard: Shard) -> slice:
    dim, parts, index = shard
    step = size // parts
    return slice(index * step, (index + 1) * step)


def _read_part(f, name: str, shard: Shard | None) -> torch.Tensor:
    """The stored tensor, or just this rank's part of it (read through get_slice)."""
    if shard is None:
        return f.get_tensor(name)
    view = f.get_slice(name)
    dim = shard[0]
    index = [slice(None)] * len(view.get_shape())
    index[dim] = _part(view.get_shape()[dim], shard)
    return view[tuple(index)]


def _take(tensor: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    if shard is None:
        return tensor
    return tensor[(slice(None),) * shard[0] + (_part(tensor.shape[shard[0]], shard),)].clone()


def _assign(model: torch.nn.Module, expected: dict[str, torch.Tensor], name: str,
            tensor: torch.Tensor, device: torch.device) -> None:
    target = expected.get(name)
    if target is None:
        raise CheckpointError(f"unexpected tensor {name} {tuple(tensor.shape)} in checkpoint")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    if name.endswith(".scale") and tensor.dtype in _SCALE_DTYPES:
        value = tensor.view(torch.float8_e8m0fnu) if tensor.dtype == torch.uint8 else tensor
    elif target.dtype in (torch.float8_e4m3fn, torch.int8, torch.int64):
        if tensor.dtype != target.dtype and not (target.dtype == torch.int64
                                                 and tensor.dtype == torch.int32):
            raise CheckpointError(
                f"tensor {name} is {tensor.dtype}, expected {target.dtype} (config says so)")
        value = tensor.to(target.dtype)
    elif target.dtype == torch.float32 and (released_in_fp32(name)
                                            or name.endswith("norm.weight")):
        # what the reference keeps in fp32 in memory: the release's fp32 tensors and the norms
        value = tensor.float()
    else:
        value = tensor  # dense weights keep their stored dtype (bf16 as released)
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    value = value.to(device)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value
