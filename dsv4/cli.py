"""`dsv4` command line: generate | serve | analyze.

Every command defaults to the embedded demo model (tiny, random weights, built on first use), so
it runs with no download and no GPU. Subcommands parse their own flags and import lazily.
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main", "version"]


def _generate(argv: list[str]) -> int:
    from dsv4.engine_args import EngineArgs

    p = argparse.ArgumentParser(prog="dsv4 generate", description="Complete prompts offline.")
    p.add_argument("prompts", nargs="+", help="prompt text (one or more; batched together)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as one user message through the official V4 chat "
                        "encoding (thinking on, as DeepSeek's API)")
    p.add_argument("--no-thinking", action="store_true", help="with --chat: chat mode")
    EngineArgs.add_cli_args(p)
    args = p.parse_args(argv)
    if args.no_thinking and not args.chat:
        p.error("--no-thinking needs --chat")

    from dsv4.llm import LLM
    from dsv4.sampling_params import SamplingParams

    from dsv4.device import DeviceError, resolve_device
    from dsv4.logs import log_to_stderr

    try:
        resolve_device(args.device)  # before anything is built or loaded
    except DeviceError as exc:
        print(f"dsv4 generate: {exc.for_flag('--device')}", file=sys.stderr)
        return 1
    log_to_stderr()  # the KV-cache size and capacity line
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        engine_args = EngineArgs.from_cli_args(args)
    except ValueError as exc:
        p.error(str(exc))
    try:
        engine_args.model_path(announce=True)
        llm = LLM.from_engine_args(engine_args, progress=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsv4 generate: {exc}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": text}] for text in args.prompts],
                               params, use_tqdm=len(args.prompts) > 1,
                               chat_template_kwargs={"thinking": not args.no_thinking})
        else:
            outputs = llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1)
    except ValueError as exc:
        p.error(str(exc))
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    for text, out in zip(args.prompts, outputs, strict=True):
        print(f"{text!r} -> {out.outputs[0].text!r}")
    print(f"[{len(outputs)} prompts, {n_out} generated tokens in {elapsed:.2f}s]",
          file=sys.stderr)
    return 0


def _serve(argv: list[str]) -> int:
    from dsv4.server.launch import main as serve_main

    return serve_main(argv)


def _analyze(argv: list[str]) -> int:
    from dsv4.analysis.cli import main as analyze_main

    return analyze_main(argv)


COMMANDS = {"generate": _generate, "serve": _serve, "analyze": _analyze}


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("dsv4")
    except PackageNotFoundError:
        from dsv4 import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"dsv4 {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: dsv4 {{{names}}} [options]\n"
              "       dsv4 --version\n\n"
              "  generate  complete prompts with a V4 checkpoint (default: embedded demo model)\n"
              "  serve     OpenAI-compatible server (default: embedded demo model)\n"
              "  analyze   per-token FLOPs and KV-cache bytes of V4 vs V3/V3.2\n\n"
              "Run `dsv4 COMMAND --help` for the options of one command.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from dsv4.device import DeviceError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except DeviceError as exc:  # --device asked for what this torch / machine cannot give
        print(f"dsv4 {argv[0]}: {exc.for_flag('--device')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
