"""The embedded default model: a tiny random-weight V4 checkpoint built on first use.

It has the real architecture (swa, csa and hca layers, hash and learned MoE, MTP), the real
129,280-token vocabulary and tokenizer, and the release's FP8/FP4 storage, at toy widths, so every
dsv4 command runs with no download and no GPU. Its weights are random: it produces gibberish, and
its config and directory name say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsv4 import env
from dsv4.config import ModelConfig
from dsv4.model.writer import write_checkpoint

__all__ = ["DEMO_CONFIG", "DEMO_NAME", "default_model_path"]

DEMO_NAME = "dsv4-demo-tiny-random"
DEMO_VERSION = 1  # bump when DEMO_CONFIG or the writer's format changes
DEMO_CONFIG = ModelConfig(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
    qk_rope_head_dim=32, q_lora_rank=64, o_groups=2, o_lora_rank=64,
    compress_ratios=(0, 4, 128, 4), index_n_heads=4, index_head_dim=32, index_topk=64,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1,
)
_NOTE = "RANDOM WEIGHTS: dsv4's embedded demo model; it is not trained and outputs gibberish"


def default_model_path() -> Path:
    """Build (once) and return the demo checkpoint directory in the dsv4 cache."""
    path = env.cache_dir() / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, DEMO_CONFIG, seed=0,
                     extra_config={"dsv4_note": _NOTE, "dsv4_demo_version": DEMO_VERSION})
    if not (path / "config.json").is_file():  # another process may have won the race
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_demo(path: Path) -> bool:
    try:
        return "dsv4_note" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
