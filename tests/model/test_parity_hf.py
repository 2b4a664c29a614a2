"""Same weights, same logits as transformers' DeepseekV4ForCausalLM (fp32, no QAT rounding)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_config

from dsv4.model import load_model, write_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

# (config overrides, sequence length): together all three kinds, hash and learned MoE, lengths
# that are not multiples of the ratios, HCA ratios 8 and 128, index_topk >= entries.
# The two implementations differ by ~7e-7 of the largest logit (fp32, no QAT rounding); 1e-4
# holds on any CPU as long as no discrete choice flips. index_topk >= entries leaves the indexer
# nothing to choose, and the learned gates' k-th and (k+1)-th scores are >= 4.9e-5 apart on
# these inputs (measured), far above that noise, so no routing can flip either.
CASES = {
    "swa-csa-hca8-csa": (dict(), 37),
    "hca128-csa-swa": (dict(num_hidden_layers=3, compress_ratios=(128, 4, 0), num_hash_layers=2,
                            index_topk=128, sliding_window=16), 290),
    "narrow-streams": (dict(num_hidden_layers=3, compress_ratios=(4, 8, 8), num_hash_layers=0,
                            hc_mult=2, qk_rope_head_dim=8, o_groups=1, index_n_heads=4,
                            index_head_dim=16, num_experts_per_tok=3), 29),
    "quantized-fp8-fp4": (dict(weight_dtype="fp8", expert_dtype="fp4", scale_fmt="ue8m0"), 23),
}


def _dense(cfg):
    return cfg.replace(weight_dtype=None, expert_dtype=None, scale_fmt=None)


def _randomize_hf(model: torch.nn.Module, cfg, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        scale = 1.0 if p.dim() == 1 else p.shape[-1] ** -0.5
        p.data = torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name else 0.0)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            b.copy_(torch.rand(b.shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, :b.shape[1]])
        elif name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("case", list(CASES))
def test_dsv4_checkpoint_loaded_by_transformers(case, tmp_path):
    overrides, seq = CASES[case]
    cfg = tiny_config(**overrides)
    if case != "quantized-fp8-fp4":
        cfg = _dense(cfg)
    hf_keys = cfg.to_hf_dict()  # transformers only parses HCA ratio 128 from compress_ratios
    path = write_checkpoint(tmp_path / "ck", cfg, tokenizer=False, extra_config={
        k: hf_keys[k] for k in ("layer_types", "compress_rates")})
    ours = load_model(path, device="cpu", emulate_quant=False, progress=False)
    kwargs = {}
    if cfg.weight_dtype == "fp8":
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(
            dequantize=True, expert_dtype="fp4")
    theirs = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                **kwargs).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        want = theirs(ids).logits
    assert rel_err(ours(ids), want) <= 1e-4


@pytest.mark.parametrize("case", ["swa-csa-hca8-csa", "hca128-csa-swa", "narrow-streams"])
def test_transformers_checkpoint_loaded_by_dsv4(case, tmp_path):
    overrides, seq = CASES[case]
    cfg = _dense(tiny_config(**overrides))
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    theirs = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    _randomize_hf(theirs, cfg, seed=3)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", device="cpu", emulate_quant=False, progress=False)
    assert ours.config.compress_ratios == cfg.compress_ratios
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    with torch.no_grad():
        want = theirs(ids).logits
    assert rel_err(ours(ids), want) <= 1e-4
