"""ModelConfig: the one frozen description of a DeepSeek-V4 network.

Parsed from a checkpoint's ``config.json`` in the three spellings found in the wild: the official
Hugging Face release (``compress_ratios``, ``num_hash_layers``, ``rope_scaling``, ...), what
transformers writes (``layer_types``, ``mlp_layer_types``, ``rope_parameters``, ...) and the
reference's ``inference/config.json`` (``dim``, ``n_layers``, ...). Everything else in dsv4 reads
model facts from here; this module imports nothing from dsv4.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "LayerKind"]

LayerKind = str  # "swa" | "csa" | "hca"

_HF_LAYER_TYPE_TO_KIND = {
    "sliding_attention": "swa",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
_KIND_TO_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPE_TO_KIND.items()}

# reference inference/config.json name -> our (HF) name
_REF_ARG_NAMES = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "norm_eps": "rms_norm_eps",
    "window_size": "sliding_window",
    "original_seq_len": "original_max_position_embeddings",
    "rope_factor": "rope_factor",
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one V4 model (defaults: V4-Flash). ``compress_ratios`` has one entry
    per trunk layer; MTP layers are sliding-window only and are counted separately."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_max_position_embeddings: int = 65536  # 0 disables YaRN on compressed layers
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4,)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    # checkpoint storage: "fp8" block-128 linears or None (bf16); experts "fp4" | "fp8" | None
    weight_dtype: str | None = "fp8"
    expert_dtype: str | None = "fp4"
    scale_fmt: str | None = "ue8m0"  # None: float32 scales (the -Base checkpoints)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        problems = []
        if len(self.compress_ratios) != self.num_hidden_layers:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        if any(r not in (0, 4) and r <= 4 for r in self.compress_ratios):
            problems.append(f"compress ratios must be 0, 4 or > 4 (HCA): {self.compress_ratios}")
        if self.num_attention_heads % self.o_groups:
            problems.append("num_attention_heads must be divisible by o_groups")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            problems.append("qk_rope_head_dim must be even and <= head_dim")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            problems.append(f"unknown scoring_func {self.scoring_func!r}")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            problems.append(f"unknown expert_dtype {self.expert_dtype!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if problems:
            raise ValueError("invalid DeepSeek-V4 config: " + "; ".join(problems))

    # ---- derived facts -------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(self.kind_of_ratio(r) for r in self.compress_ratios)

    @staticmethod
    def kind_of_ratio(ratio: int) -> LayerKind:
        return "swa" if ratio == 0 else ("csa" if ratio == 4 else "hca")

    @property
    def hca_ratio(self) -> int:
        return next((r for r in self.compress_ratios if r > 4), 128)

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def drafter(self) -> str | None:
        """The checkpoint's draft module: "mtp" (V4's MTP block), "dspark" (the -0731
        releases' DSpark drafter, named by dspark_* keys in config.json) or None."""
        if any(key.startswith("dspark_") for key in self.extra):
            return "dspark"
        return "mtp" if self.num_nextn_predict_layers > 0 else None

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        with open(file) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        d = dict(raw)
        model_type = d.get("model_type")
        is_ref_args = "dim" in d and "n_layers" in d
        if model_type != "deepseek_v4" and not (model_type is None and is_ref_args):
            raise ValueError(
                f"config.json has model_type={model_type!r}; dsv4 only runs 'deepseek_v4' models"
            )
        for ref_name, name in _REF_ARG_NAMES.items():
            if ref_name in d and name not in d:
                d[name] = d.pop(ref_name)
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        out: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "compress_ratios"}
        for key in names:
            if key in d and d[key] is not None:
                out[key] = d[key]
        out["compress_ratios"] = _parse_ratios(d, n)
        if "mlp_layer_types" in d and "num_hash_layers" not in d:
            types = list(d["mlp_layer_types"])[:n]
            num_hash = sum(1 for t in types if t == "hash_moe")
            if types[:num_hash] != ["hash_moe"] * num_hash:
                raise ValueError("mlp_layer_types: hash_moe layers must come first")
            out["num_hash_layers"] = num_hash
        if "partial_rotary_factor" in d and "qk_rope_head_dim" not in d:
            out["qk_rope_head_dim"] = int(d.get("head_dim", cls.head_dim) * d["partial_rotary_factor"])
        out.update(_parse_rope(d))
        out.update(_parse_quant(d))
        if isinstance(out.get("eos_token_id"), list):
            out["eos_token_id"] = out["eos_token_id"][0]
        out["extra"] = {k: v for k, v in raw.items() if k not in names}
        return cls(**out)

    # ---- writing ---------------------------------------------------------------------------
    def to_official_dict(self) -> dict[str, Any]:
        """The config.json of an official-format checkpoint (as DeepSeek released it)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "norm_topk_prob": True,
            "topk_method": "noaux_tc",
        }
        for f in dataclasses.fields(self):
            if f.name in ("extra", "compress_ratios", "rope_factor", "beta_fast", "beta_slow",
                          "original_max_position_embeddings", "weight_dtype", "scale_fmt"):
                continue
            d[f.name] = getattr(self, f.name)
        d["compress_ratios"] = list(self.compress_ratios) + [0] * self.num_nextn_predict_layers
        if self.original_max_position_embeddings:
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
            }
        if self.weight_dtype == "fp8":
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
                **({"scale_fmt": self.scale_fmt} if self.scale_fmt else {}),
            }
        if self.expert_dtype in (None, "bf16"):
            d.pop("expert_dtype", None)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The same model in transformers' DeepseekV4Config spelling (unquantized)."""
        d = self.to_official_dict()
        for key in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling",
                    "quantization_config", "expert_dtype", "topk_method"):
            d.pop(key, None)
        d["layer_types"] = [_KIND_TO_HF_LAYER_TYPE[k] for k in self.layer_kinds]
        d["compress_rates"] = {
            "compressed_sparse_attention": 4,
            "heavily_compressed_attention": self.hca_ratio,
        }
        d["mlp_layer_types"] = [
            "hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.num_hidden_layers)
        ]
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        compress: dict[str, Any] = {"rope_type": "default", "rope_theta": self.compress_rope_theta}
        if self.original_max_position_embeddings:
            compress = {
                "rope_type": "yarn",
                "rope_theta": self.compress_rope_theta,
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "attention_factor": 1.0,
            }
        compress["partial_rotary_factor"] = d["partial_rotary_factor"]
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": self.rope_theta,
                     "partial_rotary_factor": d["partial_rotary_factor"]},
            "compress": compress,
        }
        return d


def _parse_ratios(d: dict[str, Any], n: int) -> tuple[int, ...]:
    if "compress_ratios" in d:
        ratios = [int(r) for r in d["compress_ratios"]]
        if len(ratios) < n:
            raise ValueError(f"compress_ratios has {len(ratios)} entries for {n} layers")
        return tuple(ratios[:n])  # trailing entries belong to the MTP layers
    if "layer_types" in d:
        rates = dict(d.get("compress_rates") or {})
        rates.setdefault("compressed_sparse_attention", d.get("compress_rate_csa", 4))
        rates.setdefault("heavily_compressed_attention", d.get("compress_rate_hca", 128))
        ratios = []
        for t in list(d["layer_types"])[:n]:
            if t not in _HF_LAYER_TYPE_TO_KIND:
                raise ValueError(f"unknown layer type {t!r} in layer_types")
            ratios.append(0 if t == "sliding_attention" else int(rates[t]))
        return tuple(ratios)
    raise ValueError("config.json has neither compress_ratios nor layer_types")


def _parse_rope(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rp = d.get("rope_parameters")
    yarn: dict[str, Any] | None = None
    if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
        out["rope_theta"] = rp.get("main", {}).get("rope_theta", d.get("rope_theta", 10000.0))
        comp = rp["compress"]
        out["compress_rope_theta"] = comp.get("rope_theta", d.get("compress_rope_theta", 160000.0))
        if comp.get("rope_type", comp.get("type")) == "yarn":
            yarn = comp
        else:
            out["original_max_position_embeddings"] = 0
    else:
        rs = d.get("rope_scaling") or (rp if isinstance(rp, dict) else None)
        if rs and rs.get("rope_type", rs.get("type")) == "yarn":
            yarn = rs
        elif "rope_factor" not in d and "original_max_position_embeddings" not in d:
            out["original_max_position_embeddings"] = 0
    if yarn is not None:
        out["rope_factor"] = float(yarn.get("factor", 16.0))
        out["original_max_position_embeddings"] = int(
            yarn.get("original_max_position_embeddings", 65536)
        )
        out["beta_fast"] = float(yarn.get("beta_fast", 32.0))
        out["beta_slow"] = float(yarn.get("beta_slow", 1.0))
    for key in ("rope_factor", "beta_fast", "beta_slow"):
        if key in d and key not in out:
            out[key] = float(d[key])
    return out


def _parse_quant(d: dict[str, Any]) -> dict[str, Any]:
    q = d.get("quantization_config")
    out: dict[str, Any] = {}
    if d.get("dtype") in ("fp8", "bf16"):  # reference ModelArgs spelling
        out["weight_dtype"] = "fp8" if d["dtype"] == "fp8" else None
        out["scale_fmt"] = d.get("scale_fmt")
    elif isinstance(q, dict):
        if q.get("quant_method", "fp8") != "fp8":
            raise ValueError(f"unsupported quant_method {q.get('quant_method')!r}")
        out["weight_dtype"] = "fp8"
        out["scale_fmt"] = q.get("scale_fmt")
        if "expert_dtype" in q and "expert_dtype" not in d:
            out["expert_dtype"] = q["expert_dtype"]
    else:
        out["weight_dtype"] = None
        out["scale_fmt"] = None
    if "expert_dtype" in d:
        out["expert_dtype"] = d["expert_dtype"]
    elif "expert_dtype" not in out:
        # no expert_dtype: experts share the linears' format (FP8 "Base" checkpoints, or bf16)
        out["expert_dtype"] = out["weight_dtype"]
    return out


def _flash() -> ModelConfig:
    return ModelConfig()


def _pro() -> ModelConfig:
    return ModelConfig(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, compress_ratios=(128, 128) + (4, 128) * 29 + (4,), index_topk=1024,
        n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
    )


PRESETS: dict[str, ModelConfig] = {
    "v4-flash": _flash(),
    "v4-pro": _pro(),
    # -Base: same network, routed experts FP8 block-128 with float32 scales
    "v4-flash-base": _flash().replace(expert_dtype="fp8", scale_fmt=None),
    "v4-pro-base": _pro().replace(expert_dtype="fp8", scale_fmt=None),
}
