"""``dsv4 analyze``: per-token decode FLOPs and KV cache of V4 vs V3 / V3.2, and the claims.

    dsv4 analyze [--model v4-flash|v4-pro|v3|v3.2|PATH ...] [--context N] [--baseline v3.2]
                 [--kv-format bf16|fp8] [--indexer-keys fp4|fp8] [--plot FILE.png] [--json]
                 [--measure]

``main`` is wired as the ``analyze`` subcommand of the ``dsv4`` console script.
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv4.analysis.kv import INDEXER_KEY_FORMATS, KV_FORMATS
from dsv4.analysis.report import CLAIM_BASELINE, analyze, claim_checks, to_json

__all__ = ["build_parser", "main", "parse_context"]

DEFAULT_MODELS = ["v4-pro", "v4-flash", "v3"]
_SUFFIX = {"k": 1 << 10, "m": 1 << 20}


def parse_context(text: str) -> int:
    """'1048576', '1M', '128K', '1_000' -> tokens (K = 1024, M = 1024^2)."""
    t = text.strip().lower().replace("_", "")
    try:
        n = int(float(t[:-1]) * _SUFFIX[t[-1]]) if t and t[-1] in _SUFFIX else int(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a context length: {text!r}") from e
    if n < 1:
        raise argparse.ArgumentTypeError("context must be >= 1")
    return n


def build_parser(prog: str = "dsv4 analyze") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Per-token decode FLOPs and KV cache of DeepSeek-V4 vs V3 / V3.2, computed "
                    "from the architecture, compared with DeepSeek's published claims.")
    p.add_argument("--model", action="extend", nargs="+", metavar="NAME|PATH",
                   help="v4-flash, v4-pro, v3, v3.2 or a checkpoint dir with config.json; the "
                        "first one gives the headline ratios "
                        f"(default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--context", type=parse_context, default=1 << 20, metavar="N",
                   help="tokens already in the cache, e.g. 131072, 128K, 1M (default 1M)")
    p.add_argument("--baseline", default=CLAIM_BASELINE, metavar="NAME|PATH",
                   help="model the ratios are taken against (default v3.2)")
    p.add_argument("--kv-format", choices=KV_FORMATS, default="fp8",
                   help="KV storage: fp8 = deployment formats (default), bf16 = reference")
    p.add_argument("--indexer-keys", choices=INDEXER_KEY_FORMATS, default="fp4",
                   help="V4 indexer-key format with --kv-format fp8 (default fp4, as DeepSeek "
                        "runs it; vLLM's default is fp8)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also write FLOPs and KV against context (1K-1M) as a PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--measure", action="store_true",
                   help="also count FLOPs by running dsv4.model on the meta device and compare "
                        "per layer kind")
    return p


def _measure(models: list[str], context: int) -> dict[str, list[dict[str, object]]]:
    from dsv4.analysis.measure import compare
    from dsv4.analysis.report import resolve_model
    from dsv4.config import ModelConfig

    out: dict[str, list[dict[str, object]]] = {}
    for spec in models:
        key, _, cfg = resolve_model(spec)
        if isinstance(cfg, ModelConfig):
            out[key] = [{"kind": c.kind, "layers": c.layers, "analytic": c.analytic,
                         "measured": c.measured, "rel_err": c.rel_err}
                        for c in compare(cfg, context)]
    return out


def _measure_text(measured: dict[str, list[dict[str, object]]], context: int) -> str:
    lines = [f"Measured at context {context:,}: dsv4.model's forward, one token, meta device,",
             "FlopCounterMode, real widths, layers SWA CSA HCA CSA HCA SWA (GFLOP per kind):"]
    for key, rows in measured.items():
        for r in rows:
            lines.append(f"  {key:<10} {r['kind']:<5} x{r['layers']}  analytic "
                         f"{r['analytic'] / 1e9:10.3f}  measured {r['measured'] / 1e9:10.3f}  "
                         f"diff {100 * float(r['rel_err']):.2f}%")  # type: ignore[arg-type]
    if context < 127:
        lines += ["  (below the 128-token window the model scores all 128 window slots, masked;",
                  "  the analytic count uses only the visible ones)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = args.model or DEFAULT_MODELS
    try:
        analysis = analyze(models, args.context, args.baseline, args.kv_format, args.indexer_keys)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv4 analyze: {e}", file=sys.stderr)
        return 2
    checks = claim_checks(args.kv_format, args.indexer_keys)
    measured = None
    if args.measure:
        from dsv4.analysis.measure import model_api_available

        if not model_api_available():
            print("dsv4 analyze: --measure needs dsv4.model (DeepseekV4ForCausalLM, "
                  "SequenceCache.synthetic), which is not available", file=sys.stderr)
            return 1
        measured = _measure(models, args.context) or _measure(["v4-flash", "v4-pro"],
                                                              args.context)
    if args.plot:
        from dsv4.analysis.plot import MissingPlotDependency, write_plot

        try:
            write_plot(args.plot, models, args.kv_format, args.indexer_keys)
        except MissingPlotDependency as e:
            print(f"dsv4 analyze: {e}", file=sys.stderr)
            return 1
    if args.json:
        obj = to_json(analysis, checks)
        if measured is not None:
            obj["measured"] = measured
        if args.plot:
            obj["plot"] = args.plot
        print(json.dumps(obj, indent=2))
        return 0
    from dsv4.analysis.text import render

    sys.stdout.write(render(analysis, checks))
    if measured is not None:
        sys.stdout.write("\n" + _measure_text(measured, args.context))
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
