"""``dsv4 analyze --plot``: FLOPs per token and KV per sequence against context, as a PNG.

Two log-log panels from 1K to 1M tokens for V4-Flash, V4-Pro, V3 and V3.2 (plus any checkpoint
given with ``--model PATH``). matplotlib is an optional extra (``pip install 'dsv4[plot]'``) and
is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from dsv4.analysis.flops import flops_per_token
from dsv4.analysis.kv import kv_bytes_per_sequence
from dsv4.analysis.report import resolve_model

__all__ = ["PLOT_MODELS", "MissingPlotDependency", "contexts", "write_plot"]

PLOT_MODELS = ("v4-flash", "v4-pro", "v3", "v3.2")


class MissingPlotDependency(RuntimeError):
    pass


def contexts(lo: int = 1 << 10, hi: int = 1 << 20, per_octave: int = 4) -> list[int]:
    """Geometric grid of context lengths from ``lo`` to ``hi`` inclusive."""
    out, k = [], 0
    while True:
        n = round(lo * 2 ** (k / per_octave))
        if n >= hi:
            return [*out, hi]
        out.append(n)
        k += 1


def write_plot(path: str | Path, models: list[str] | None = None, kv_format: str = "fp8",
               index_keys: str = "fp4") -> Path:
    """Write the two-panel PNG to ``path`` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingPlotDependency(
            "--plot needs matplotlib, an optional extra: pip install 'dsv4[plot]' "
            "(or pip install matplotlib)"
        ) from e
    resolved = {}
    for spec in [*PLOT_MODELS, *(models or [])]:
        key, name, cfg = resolve_model(spec)
        resolved.setdefault(key, (name, cfg))
    xs = contexts()
    fig, (ax_f, ax_k) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, cfg in resolved.values():
        flops = [sum(flops_per_token(cfg, n).values()) / 1e9 for n in xs]
        kv = [sum(kv_bytes_per_sequence(cfg, n, kv_format, index_keys).values()) / 2**30
              for n in xs]
        style = "-" if name.startswith("V4") else "--"
        ax_f.plot(xs, flops, style, marker=".", label=name)
        ax_k.plot(xs, kv, style, marker=".", label=name)
    fmt = "bf16" if kv_format == "bf16" else f"FP8 KV, V4 {index_keys.upper()} indexer keys"
    ax_f.set_title("Decode FLOPs per token (matmuls, 2 FLOPs/MAC)")
    ax_f.set_ylabel("GFLOP per token")
    ax_k.set_title(f"KV cache per sequence ({fmt})")
    ax_k.set_ylabel("GiB per sequence")
    for ax in (ax_f, ax_k):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_xticks([1 << k for k in range(10, 21, 2)],
                      ["1K", "4K", "16K", "64K", "256K", "1M"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("DeepSeek-V4 vs V3 / V3.2: per-token decode cost against context")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
