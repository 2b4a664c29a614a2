"""Checkpoint loading: formats kept in memory, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FP32_BOUND, rel_err, tiny_config
from safetensors.torch import load_file, save_file

from dsv4.model import CheckpointError, load_model, random_state_dict, write_checkpoint
from dsv4.model.linear import Linear


def test_weights_stay_in_checkpoint_precision(tiny_checkpoint):
    path = tiny_checkpoint(tiny_config(weight_dtype="fp8", expert_dtype="fp4"))
    model = load_model(path, device="cpu", progress=False)
    attn = model.layers[1].attn
    assert attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert attn.wq_b.scale.dtype == torch.float8_e8m0fnu
    assert model.layers[1].ffn.experts["0"].w1.weight.dtype == torch.int8  # packed FP4
    assert model.embed.weight.dtype == torch.bfloat16  # as released
    assert model.layers[1].hc_attn_fn.dtype == torch.float32
    stored = sum(t.numel() * t.element_size() for t in random_state_dict(model.config).values())
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(b.numel() * b.element_size() for b in model.buffers())
    assert resident < 1.5 * stored


def test_dtype_option_expands_weights_with_same_logits(tiny_checkpoint):
    path = tiny_checkpoint()
    # the same fp32 weights and matmul shapes: equal to 0 where measured; without the QAT
    # rounding a kernel that summed in another order could not turn that into more than the
    # documented fp32 noise
    packed = load_model(path, device="cpu", emulate_quant=False, progress=False)
    dense = load_model(path, device="cpu", dtype=torch.float32, emulate_quant=False,
                       progress=False)
    assert all(m.fmt == "dense" for m in dense.modules() if isinstance(m, Linear))
    ids = torch.randint(0, 512, (1, 17))
    assert rel_err(dense(ids), packed(ids)) <= FP32_BOUND


def test_base_style_fp8_experts_with_float32_scales(tiny_checkpoint):
    cfg = tiny_config(weight_dtype="fp8", expert_dtype="fp8", scale_fmt=None)
    model = load_model(tiny_checkpoint(cfg), device="cpu", progress=False)
    w1 = model.layers[0].ffn.experts["0"].w1
    assert w1.weight.dtype == torch.float8_e4m3fn and w1.scale.dtype == torch.float32
    assert torch.isfinite(model(torch.randint(0, 512, (1, 9)))).all()


def _single_shard(path):
    (shard,) = sorted(path.glob("*.safetensors"))
    return shard, load_file(str(shard))


def test_missing_tensor_is_named_with_its_shape(tiny_checkpoint):
    path = tiny_checkpoint()
    shard, tensors = _single_shard(path)
    del tensors["layers.2.attn.compressor.ape"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.compressor\.ape \(8, 64\)"):
        load_model(path, device="cpu", progress=False)


def test_misshaped_and_unexpected_tensors_are_named(tiny_checkpoint):
    path = tiny_checkpoint()
    shard, tensors = _single_shard(path)
    tensors["layers.0.attn.attn_sink"] = torch.zeros(5)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.attn_sink.*\(5,\).*\(4,\)"):
        load_model(path, device="cpu", progress=False)
    tensors["layers.0.attn.attn_sink"] = torch.zeros(4)
    tensors["layers.0.attn.bogus"] = torch.zeros(3)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.0\.attn\.bogus"):
        load_model(path, device="cpu", progress=False)


def test_wrong_dtype_for_quantized_weight(tiny_checkpoint):
    path = tiny_checkpoint(tiny_config(weight_dtype="fp8"))
    shard, tensors = _single_shard(path)
    tensors["layers.0.attn.wkv.weight"] = tensors["layers.0.attn.wkv.weight"].float()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wkv\.weight.*float8_e4m3fn"):
        load_model(path, device="cpu", progress=False)


def test_not_a_deepseek_v4_config(tiny_checkpoint):
    path = tiny_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="deepseek_v4"):
        load_model(path, device="cpu", progress=False)


def test_only_safetensors_are_read(tmp_path):
    path = tmp_path / "ck"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_config().to_official_dict()))
    torch.save({"embed.weight": torch.zeros(1)}, path / "pytorch_model.bin")
    (path / "modeling_deepseek.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_model(path, device="cpu", progress=False)


def test_sharded_checkpoint_with_mtp(tmp_path):
    cfg = tiny_config()
    path = write_checkpoint(tmp_path / "ck", cfg, tokenizer=True, shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(n.startswith("mtp.0.e_proj") for n in index["weight_map"])
    assert (path / "tokenizer.json").is_file()
    model = load_model(path, device="cpu", progress=False)
    assert len(model.mtp) == 1
    without = write_checkpoint(tmp_path / "no_mtp", cfg, tokenizer=False,
                               state=random_state_dict(cfg, with_mtp=False))
    assert len(load_model(without, device="cpu", progress=False).mtp) == 0


def test_dspark_checkpoint_loads_its_trunk_and_says_its_drafter_is_unsupported(
        tiny_checkpoint, caplog):
    """A -0731-style checkpoint (dspark_* keys, 3 trailing compress ratios, drafter tensors
    the MTP block does not have): the trunk loads and computes as before; the drafter's tensors
    are skipped with a warning; speculative decoding is refused with a message naming DSpark."""
    from dsv4 import LLM

    path = tiny_checkpoint()
    want = load_model(path, device="cpu", progress=False)
    config = json.loads((path / "config.json").read_text())
    config.update(dspark_block_size=5, dspark_noise_token_id=500, dspark_markov_rank=16,
                  dspark_target_layer_ids=[1, 2, 3])
    config["compress_ratios"] = list(config["compress_ratios"]) + [0, 0]
    (path / "config.json").write_text(json.dumps(config))
    shard, tensors = _single_shard(path)
    tensors["mtp.2.e_proj.weight"] = torch.zeros(64, 64)  # no such stage in an MTP block
    tensors["dspark.markov.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(shard))
    with caplog.at_level("WARNING", logger="dsv4.model.loader"):
        model = load_model(path, device="cpu", progress=False)
    assert model.config.drafter == "dspark" and len(model.mtp) == 0
    assert "DSpark" in caplog.text and "not support" in caplog.text
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    assert rel_err(model(ids), want(ids)) <= FP32_BOUND
    with pytest.raises(ValueError, match="DSpark"):
        LLM(path, device="cpu", kv_cache_memory=16 << 20, max_model_len=64, block_size=16,
            speculative_config={"method": "mtp", "num_speculative_tokens": 1})
