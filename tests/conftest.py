"""Shared fixtures: tiny V4 configs (real layer kinds, toy widths) and checkpoint builders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The Triton kernel tests (tests/kernels) run in Triton's CPU interpreter where there is no GPU.
# triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated, and
# importing dsv4 may import it (torch.compiler pulls in triton where it is installed), so it
# is set first; nothing else reads it. On a GPU (benchmarks/gpu_check.py) the kernels run
# compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.config import ModelConfig  # noqa: E402
from dsv4.model import load_model, write_checkpoint  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
_REPO = Path(__file__).resolve().parents[1]
# the official chat fixtures: shared/ beside the repo (CI, sessions) or inside it
CHAT_EXAMPLES = next((p for p in (SHARED / "data" / "dsv4_chat_examples.json",
                                  _REPO / "shared" / "data" / "dsv4_chat_examples.json")
                      if p.is_file()), None)
CHAT_DATA = json.loads(CHAT_EXAMPLES.read_text(encoding="utf-8")) if CHAT_EXAMPLES else {}


def tiny_config(**overrides) -> ModelConfig:
    """~4 layers: swa, csa, hca (ratio 8 so short prompts reach it), csa; one hash layer."""
    base = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        compress_ratios=(0, 4, 8, 4), index_n_heads=2, index_head_dim=32, index_topk=64,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, num_hash_layers=1,
        hc_mult=4, hc_sinkhorn_iters=5, original_max_position_embeddings=32, rope_factor=4.0,
        num_nextn_predict_layers=1,
    )
    base.update(overrides)
    return ModelConfig(**base)

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_device() -> str:
    """Where the kernel tests run their kernels: the GPU if there is one, else the CPU
    (interpreted)."""
    return KERNEL_DEVICE


def pytest_configure(config):
    """DSV4_TEST_THREADS=N runs the whole session on N torch threads (CI runs the suite once
    more with 1: results must not depend on how a reduction is split across threads)."""
    value = os.environ.get("DSV4_TEST_THREADS", "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"DSV4_TEST_THREADS must be a positive integer, got {value!r}")
    torch.set_num_threads(int(value))


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, " \
           f"CPU capability {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # a multi-process engine's driver takes its share of the cores (dsv4.engine.worker)
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: (config, **write kwargs) -> checkpoint directory."""

    def make(config: ModelConfig | None = None, name: str = "ckpt", **kw) -> Path:
        return write_checkpoint(tmp_path / name, config or tiny_config(), tokenizer=False, **kw)

    return make


@pytest.fixture
def tiny_model(tiny_checkpoint):
    def make(config: ModelConfig | None = None, **load_kw):
        return load_model(tiny_checkpoint(config), device="cpu", progress=False, **load_kw)

    return make


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Bounds for "same logits however chunked or batched" (docs/architecture.md, "Numerics across
# batch shapes"). fp32 with the FP8/FP4 QAT rounding on has none: a 1-ulp difference between
# batch shapes can cross a rounding boundary, so tests assert that case in fp64.
#
# fp64, rounding on: batch-shape noise is ~1e-16, far below any rounding step, and the model
# hands its logits out as fp32 (`DeepseekV4ForCausalLM.logits`), so at most an fp32 rounding
# of a logit moves by one ulp: 2^-23 of the largest logit at worst. Measured: 0.
FP64_BOUND = 2.0 ** -22
# fp32, rounding off: within 1.6e-6 of the largest logit (worst over 36 model-level and 13
# engine-level random checkpoints, AVX2 and scalar kernels, 1 and 2 threads); 6x margin.
FP32_BOUND = 1e-5
