"""ModelConfig parsing in the official, transformers and reference-args spellings."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from dsv4.config import PRESETS, ModelConfig

OFFICIAL_FLASH = {  # the released V4-Flash config.json (architecture.md 1.1)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "compress_rope_theta": 160000,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 16,
                                          "original_max_position_embeddings": 65536,
                                          "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
    "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "num_hash_layers": 3, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "vocab_size": 129280,
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1, "hidden_act": "silu", "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16",
}


def test_official_flash_config_equals_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_FLASH))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg == PRESETS["v4-flash"]
    assert cfg.layer_kinds[:4] == ("swa", "swa", "csa", "hca") and cfg.layer_kinds[42] == "csa"
    assert len(cfg.compress_ratios) == 43  # the trailing MTP entry is not a trunk layer


def test_presets_match_the_spec():
    pro = PRESETS["v4-pro"]
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts, pro.index_topk) == (
        7168, 61, 384, 1024)
    assert pro.layer_kinds.count("csa") == 30 and pro.layer_kinds.count("hca") == 31
    assert PRESETS["v4-flash"].layer_kinds.count("swa") == 2
    base = PRESETS["v4-pro-base"]
    assert base.expert_dtype == "fp8" and base.scale_fmt is None and base.weight_dtype == "fp8"


@pytest.mark.parametrize("name", list(PRESETS))
def test_official_and_transformers_spellings_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_dict(cfg.to_official_dict()) == cfg
    dense = cfg.replace(weight_dtype=None, expert_dtype=None, scale_fmt=None)
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == dense


def test_transformers_written_config():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(compress_ratios=(0, 4, 8, 4), weight_dtype=None, expert_dtype=None,
                      scale_fmt=None)
    hf = transformers.DeepseekV4Config(**cfg.to_hf_dict()).to_dict()
    assert ModelConfig.from_dict(hf) == cfg


def test_reference_inference_args():
    ref = {"dim": 64, "n_layers": 2, "n_heads": 4, "moe_inter_dim": 64, "n_hash_layers": 1,
           "n_routed_experts": 8, "n_activated_experts": 2, "score_func": "sqrtsoftplus",
           "route_scale": 2.5, "window_size": 8, "rope_head_dim": 16, "head_dim": 64,
           "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "compress_ratios": [4, 128, 0],
           "original_seq_len": 65536, "rope_factor": 16, "dtype": "fp8", "scale_fmt": "ue8m0",
           "expert_dtype": "fp4", "index_n_heads": 2, "index_head_dim": 32, "vocab_size": 512}
    cfg = ModelConfig.from_dict(ref)
    assert cfg.hidden_size == 64 and cfg.compress_ratios == (4, 128)
    assert cfg.routed_scaling_factor == 2.5 and cfg.sliding_window == 8
    assert cfg.weight_dtype == "fp8" and cfg.expert_dtype == "fp4"


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="compress_ratios has 2 entries for 4 layers"):
        tiny_config(compress_ratios=(0, 4))
    with pytest.raises(ValueError, match="neither compress_ratios nor layer_types"):
        ModelConfig.from_dict({"model_type": "deepseek_v4", "num_hidden_layers": 2})
