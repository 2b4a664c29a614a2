"""One rank's part of the model (TP, EP, expert TP, DP-attention) against the whole model in one
process: the same logits within the documented bounds, the same number of collectives per
layer, and loading that reads only the rank's part."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_BOUND, FP64_BOUND, rel_err
from rank_threads import parallel_test_config, run_ranks

from dsv4.distributed import ParallelConfig, ParallelContext, ParallelLayoutError
from dsv4.model import load_model

# name -> layout; every one splits heads, indexer heads, output groups and experts
LAYOUTS = {
    "tp2": ParallelConfig(tensor_parallel_size=2),
    "tp2-ep": ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True),
    "tp4-ep2": ParallelConfig(tensor_parallel_size=4, expert_parallel_size_override=2),
    "tp2-dp2-ep": ParallelConfig(tensor_parallel_size=2, data_parallel_size=2,
                                 enable_expert_parallel=True),
    "dp2-ep": ParallelConfig(data_parallel_size=2, enable_expert_parallel=True),
}
MODES = {"fp64-quant": (torch.float64, True, FP64_BOUND),
         "fp32-noquant": (torch.float32, False, FP32_BOUND)}


def _load(path, dtype, quant, parallel=None):
    return load_model(path, device="cpu", dtype=None if dtype == torch.float32 else dtype,
                      emulate_quant=quant, progress=False, parallel=parallel)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dsv4.model import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("par") / "ckpt", parallel_test_config(),
                            tokenizer=False, seed=3)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rank_logits_equal_single_process(checkpoint, layout, mode):
    dtype, quant, bound = MODES[mode]
    pconf = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    # one prompt per data-parallel group, of different lengths; long enough for the indexer's
    # top-k (8 of up to 11 CSA entries) and the ratio-8 HCA layer
    prompts = [torch.randint(0, 512, (1, 45 - 7 * g), generator=gen)
               for g in range(pconf.data_parallel_size)]
    single = _load(checkpoint, dtype, quant)
    want = [single(p) for p in prompts]

    def rank(ctx: ParallelContext) -> torch.Tensor:
        model = _load(checkpoint, dtype, quant, ctx)
        return model(prompts[pconf.dp_rank(ctx.rank)])

    got = run_ranks(pconf, rank)
    for r, logits in enumerate(got):
        assert rel_err(logits, want[pconf.dp_rank(r)]) <= bound, f"rank {r}"
        # the ranks of one tensor-parallel group hand out the very same logits
        assert torch.equal(logits, got[pconf.tp_group(r)[0]])


def test_an_idle_data_parallel_group_still_joins(checkpoint):
    """A DP group with no tokens this step runs an empty forward, so the MoE collectives of the
    busy group complete, and its logits are those of the whole model."""
    pconf = LAYOUTS["dp2-ep"]
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(2))
    want = _load(checkpoint, torch.float64, True)(ids)

    def rank(ctx: ParallelContext) -> torch.Tensor:
        model = _load(checkpoint, torch.float64, True, ctx)
        return model(ids if ctx.rank == 0 else ids[:, :0])

    got = run_ranks(pconf, rank)
    assert rel_err(got[0], want) <= FP64_BOUND
    assert got[1].shape == (1, 0, 512)


def test_collectives_per_layer_and_step(checkpoint):
    """TP: one all-reduce per attention sub-layer (two on CSA layers past the top-k: the
    indexer's scores meet before it, as in the reference), one per MoE, one for the embedding,
    one all-gather for the head. DP-attention: per MoE one all-gather (dispatch) and one
    reduce-scatter (combine), plus two small all-gathers per step."""
    config = parallel_test_config()
    layers = config.num_hidden_layers
    csa = sum(r == 4 for r in config.compress_ratios)
    ids = torch.randint(0, 512, (1, 45))  # 11 CSA entries: past the top-k of 8

    def counts(ctx: ParallelContext) -> dict[str, int]:
        model = _load(checkpoint, torch.float32, True, ctx)
        ctx.reset_counts()
        model(ids)
        return ctx.collective_counts()

    tp = run_ranks(LAYOUTS["tp2"], counts)
    assert tp[0] == {"tp.all_reduce": 1 + layers + csa, "tp.all_gather": 1,
                     "moe.all_reduce": layers}
    dp = run_ranks(LAYOUTS["dp2-ep"], counts)
    assert dp[0] == {"dp.all_gather": 2 + layers, "moe.reduce_scatter": layers}


def test_each_rank_holds_its_share_of_the_weights(checkpoint):
    pconf = LAYOUTS["tp2-ep"]
    whole = _load(checkpoint, torch.float32, True)

    def size(model: torch.nn.Module, part: str) -> int:
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.startswith(part) or f".{part}" in n)

    def shares(ctx: ParallelContext) -> dict[str, int]:
        model = _load(checkpoint, torch.float32, True, ctx)
        layer = model.layers[1]
        assert sorted(layer.ffn.experts) == [str(e) for e in range(4 * ctx.rank, 4 * ctx.rank + 4)]
        assert layer.attn.wq_b.weight.dtype == torch.float8_e4m3fn  # kept as stored
        return {p: size(model, p) for p in ("ffn.experts.", "attn.wq_b.", "embed.", "head.")}

    for share in run_ranks(pconf, shares):
        for part, nbytes in share.items():
            assert nbytes * 2 == size(whole, part), part


@pytest.mark.parametrize("overrides, layout, message", [
    (dict(num_attention_heads=6, o_groups=3), ParallelConfig(tensor_parallel_size=4),
     "num_attention_heads=6 is not divisible by tensor_parallel_size=4"),
    ({}, ParallelConfig(tensor_parallel_size=2, data_parallel_size=3,
                        enable_expert_parallel=True),
     "n_routed_experts=8 is not divisible by expert_parallel_size=6"),
    (dict(o_lora_rank=32), ParallelConfig(tensor_parallel_size=2),
     "attn.wo_a rows: 64 per rank"),
    ({}, ParallelConfig(tensor_parallel_size=2, data_parallel_size=4), "FP4 scale blocks"),
])
def test_a_layout_the_checkpoint_cannot_take_is_named(overrides, layout, message):
    with pytest.raises(ParallelLayoutError, match=message):
        layout.check(parallel_test_config(**overrides))


@pytest.mark.parametrize("preset, expert_dtype, tp, dp, ep", [
    ("v4-flash", "fp4", 4, 1, False), ("v4-flash", "fp4", 1, 4, True),
    ("v4-pro", "fp4", 8, 1, False), ("v4-pro", "fp4", 1, 8, True),
    ("v4-pro", "fp8", 16, 1, True), ("v4-pro", "fp8", 2, 8, True),
])
def test_the_readme_layouts_fit_the_released_models(preset, expert_dtype, tp, dp, ep):
    from dsv4.config import PRESETS

    ParallelConfig(tp, dp, ep).check(PRESETS[preset].replace(expert_dtype=expert_dtype))


def test_pro_fp8_experts_need_expert_parallelism_at_16_ranks():
    from dsv4.config import PRESETS

    with pytest.raises(ParallelLayoutError, match="192 per rank"):
        ParallelConfig(16).check(PRESETS["v4-pro"].replace(expert_dtype="fp8"))


@pytest.mark.parametrize("layout", [ParallelConfig(2), ParallelConfig(4),
                                    ParallelConfig(4, enable_expert_parallel=True),
                                    ParallelConfig(1, 2, True)])
def test_the_demo_model_splits(layout):
    """`dsv4 serve -tp 2` works out of the box on the embedded demo model."""
    from dsv4.demo import DEMO_CONFIG

    layout.check(DEMO_CONFIG)
