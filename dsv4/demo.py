"""The embedded default model: a tiny random-weight V4 checkpoint built on first use.

It has the real architecture (swa, csa and hca layers, hash and learned MoE, MTP), the real
129,280-token vocabulary and tokenizer, and the release's FP8/FP4 storage, at toy widths, so every
dsv4 command runs with no download and no GPU. Its weights are random: it produces gibberish, and
its config and directory name say so. `resolve_model` turns a command's MODEL argument (a
directory, a local Hugging Face repo id, or nothing: the demo) into a checkpoint directory.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from dsv4 import env
from dsv4.config import ModelConfig

__all__ = ["DEMO_CONFIG", "DEMO_NAME", "default_model_path", "resolve_model"]

DEMO_NAME = "dsv4-demo-tiny-random"
DEMO_VERSION = 2  # bump when DEMO_CONFIG or the writer's format changes
# every split of -tp 2 and -tp 4 lands on whole FP8 (128) and FP4 (32) scale blocks
DEMO_CONFIG = ModelConfig(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
    qk_rope_head_dim=32, q_lora_rank=64, o_groups=4, o_lora_rank=128,
    compress_ratios=(0, 4, 128, 4), index_n_heads=8, index_head_dim=64, index_topk=64,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=1,
)
_NOTE = "RANDOM WEIGHTS: dsv4's embedded demo model; it is not trained and outputs gibberish"


def default_model_path() -> Path:
    """Build (once) and return the demo checkpoint directory in the dsv4 cache."""
    path = env.cache_dir() / f"{DEMO_NAME}-v{DEMO_VERSION}"
    if (path / "config.json").is_file():
        return path
    from dsv4.model.writer import write_checkpoint  # only when the demo is first built

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


def resolve_model(model: str | Path | None, announce: bool = True) -> tuple[Path, str]:
    """The MODEL argument of a command -> (checkpoint directory, default served name): a
    directory, a Hugging Face repo id already in the local HF cache, or None for the demo model
    (announced on stderr unless ``announce`` is False). FileNotFoundError with a clear message
    otherwise."""
    if model is None:
        path = default_model_path()
        if announce:
            print(f"dsv4: using the embedded demo model at {path} (RANDOM weights: expect "
                  "gibberish)", file=sys.stderr)
        return path, DEMO_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
        return path, path.name
    model = str(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) is None:
        raise FileNotFoundError(f"{model!r} is neither a directory nor a Hugging Face repo id "
                                "(org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{model!r} is not a directory, and resolving a Hugging Face "
                                "repo id needs the huggingface_hub package (pip install "
                                "huggingface_hub)") from None
    try:
        return Path(snapshot_download(model, local_files_only=True)), model
    except Exception as exc:  # noqa: BLE001 - every failure means "not in the local cache"
        raise FileNotFoundError(f"{model!r} is not in the local Hugging Face cache "
                                f"({type(exc).__name__}); download it first, e.g. "
                                f"`huggingface-cli download {model}`") from None
