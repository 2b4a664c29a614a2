"""`dsv4` command line: generate | analyze.

Every command defaults to the embedded demo model (tiny, random weights, built on first use), so
it runs with no download and no GPU. Subcommands parse their own flags and import lazily.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _resolve_model(model: str | None) -> Path:
    from dsv4.model.default import default_model_path, is_demo

    path = Path(model) if model else default_model_path()
    if not (path / "config.json").is_file():
        raise SystemExit(f"dsv4: {path} is not a checkpoint directory (no config.json)")
    if is_demo(path):
        print(f"dsv4: using the embedded demo model at {path} "
              "(RANDOM weights: expect gibberish)", file=sys.stderr)
    return path


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv4 generate", description="Complete prompts.")
    p.add_argument("prompts", nargs="+", help="prompt text (one or more)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-emulate-quant", action="store_true",
                   help="turn off the reference's FP8/FP4 KV and indexer rounding")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")

    import torch

    from dsv4.model import load_model
    from dsv4.tokenizer import Tokenizer

    path = _resolve_model(args.model)
    model = load_model(path, device=args.device, emulate_quant=not args.no_emulate_quant)
    tok = Tokenizer.from_pretrained(path)
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for prompt in args.prompts:
        ids = tok.encode(prompt)
        if not ids:
            p.error("empty prompt")
        cache = model.new_cache()
        start = time.perf_counter()
        logits = model(torch.tensor([ids], device=device), cache)[:, -1]
        out: list[int] = []
        for _ in range(args.max_tokens):
            if args.temperature > 0:
                probs = (logits / args.temperature).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:
                nxt = int(logits.argmax(-1))
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
            logits = model(torch.tensor([[nxt]], device=device), cache)[:, -1]
        elapsed = time.perf_counter() - start
        print(f"{prompt!r} -> {tok.decode(out)!r}")
        print(f"  [{len(ids)} prompt + {len(out)} generated tokens in {elapsed:.2f}s]",
              file=sys.stderr)
    return 0


def _analyze(argv: list[str]) -> int:
    from dsv4.analysis.cli import main as analyze_main

    return analyze_main(argv)


COMMANDS = {"generate": _generate, "analyze": _analyze}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: dsv4 {{{names}}} [options]\n\n"
              "  generate  complete prompts with a V4 checkpoint (default: embedded demo model)\n"
              "  analyze   per-token FLOPs and KV-cache bytes of V4 vs V3/V3.2\n\n"
              "Run `dsv4 COMMAND --help` for the options of one command.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
