"""`dsv4 serve [MODEL]`: load a checkpoint, start the OpenAI-compatible server, print its URL.

MODEL is a checkpoint directory, a Hugging Face repo id already in the local HF cache (resolved
with ``huggingface_hub.snapshot_download(local_files_only=True)``; nothing is downloaded), or
nothing for the embedded demo model. Flags follow vLLM's names. The API key comes from
``--api-key`` or ``DSV4_API_KEY``. Ctrl-C / SIGTERM stop accepting requests, give running ones
a few seconds, then stop the engine thread; exit status 0. The --device and the port are checked
before anything loads (the socket is bound then and handed to uvicorn, see dsv4.server.bind): an
impossible device or a busy port fails at once, in one line, exit status 1.
"""

from __future__ import annotations

import argparse
import copy
import re
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from dsv4.cli import DTYPE_CHOICES, DTYPE_HELP, dtype_from_flag
from dsv4.demo import resolve_model
from dsv4.server.bind import bind_socket

__all__ = ["main", "parse_bytes", "resolve_model"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '512MiB', '2e9', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 8GiB, 512MiB)")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4 serve",
                                description="OpenAI-compatible server for DeepSeek-V4.")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or HF repo id in the local HF cache "
                        "(default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $DSV4_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the directory or repo name)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's context)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV-cache budget, e.g. 8GiB (default: a share of free memory)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp32", "bf16", "fp8"), default="auto",
                   help="cache entry format (auto: the compute dtype; fp8: 584-byte entries "
                   "with FP4 indexer keys)")
    p.add_argument("--reasoning-effort-profile", choices=("auto", "preview", "0731"),
                   default="auto", help="effort table: auto reads the checkpoint's "
                   "encoding/encoding_dsv4.py, else preview")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no access line per request (method, path, status, tokens, latency)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no load line every 10 s while busy (running, waiting, KV-cache "
                   "usage, tokens/s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from dsv4 import env
    from dsv4.device import DeviceError, resolve_device

    try:
        resolve_device(args.device)  # before anything is built or loaded
    except DeviceError as exc:
        print(f"dsv4 serve: {exc.for_flag('--device')}", file=sys.stderr)
        return 1
    api_key = args.api_key or env.api_key()
    sock = bind_socket(args.host, args.port)  # a busy port fails now, not after the load
    try:
        path, default_name = resolve_model(args.model)
    except SystemExit:
        sock.close()
        raise
    names = args.served_model_name or [default_name]
    engine_args = {k: v for k, v in (
        ("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs),
        ("max_num_batched_tokens", args.max_num_batched_tokens),
        ("kv_cache_memory", args.kv_cache_memory),
        ("kv_cache_dtype", None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype))
        if v is not None}
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while loading: stop cleanly
    try:
        return _serve(args, path, names, api_key, engine_args, sock)
    except KeyboardInterrupt:
        print("dsv4 serve: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _interrupt(sig: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace, path: Path, names: list[str], api_key: str | None,
           engine_args: dict, sock: socket.socket) -> int:
    from dsv4.async_llm import AsyncLLM
    from dsv4.encoding_effort import detect_effort_profile
    from dsv4.engine.llm_engine import LLMEngine
    from dsv4.server.app import build_app
    from dsv4.tokenizer import Tokenizer

    profile = args.reasoning_effort_profile
    if profile == "auto":
        profile = detect_effort_profile(path)
    print(f"dsv4 serve: loading {path} ...", file=sys.stderr, flush=True)
    try:
        engine = LLMEngine.from_pretrained(path, device=args.device,
                                           dtype=dtype_from_flag(args.dtype), progress=True,
                                           **engine_args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsv4 serve: cannot load {path}: {exc}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer.from_pretrained(path)
    engine.eos_token_id = tokenizer.eos_token_id
    llm = AsyncLLM(engine)
    try:
        app = build_app(llm, tokenizer, names, api_key=api_key, effort_profile=profile,
                        model_root=str(path), log_requests=not args.disable_log_requests,
                        log_stats=not args.disable_log_stats)
        # uvicorn's access log stays off: dsv4.access replaces it, with token counts
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, access_log=False,
                                log_config=_log_config(args.log_level))
        banner = (f"model: {', '.join(names)}  max_model_len: {engine.config.max_model_len}  "
                  f"effort profile: {profile}  api key: {'required' if api_key else 'none'}")
        _Server(config, banner).run(sockets=[sock])
    finally:
        llm.shutdown()
    print("dsv4 serve: stopped", file=sys.stderr)
    return 0


def _log_config(level: str) -> dict:
    """uvicorn's logging setup plus the dsv4 loggers (access, stats, errors) on its stderr
    handler and format, at --log-level; without it their INFO lines would go nowhere."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dsv4"] = {"handlers": ["default"], "level": level.upper(),
                                 "propagate": False}
    return config


class _Server(uvicorn.Server):
    """uvicorn.Server that prints the URL once the socket is bound (port 0 resolved)."""

    def __init__(self, config: uvicorn.Config, banner: str) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        print(f"dsv4 serve: ready at http://{shown}:{port}/v1  {self.banner}", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # as uvicorn's, minus re-raising the signal after shutdown: we exit 0 by ourselves
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for running requests
        else:
            self.should_exit = True
