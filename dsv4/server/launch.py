"""`dsv4 serve [MODEL]`: load a checkpoint, start the OpenAI-compatible server, print its URL.

MODEL is a checkpoint directory, a Hugging Face repo id already in the local HF cache (resolved
with ``huggingface_hub.snapshot_download(local_files_only=True)``; nothing is downloaded), or
nothing for the embedded demo model. Flags follow vLLM's names; the engine's come from
``EngineArgs``, the same as ``dsv4 generate``'s. The API key comes from
``--api-key`` or ``DSV4_API_KEY``. Ctrl-C / SIGTERM stop accepting requests, give running ones
a few seconds, then stop the engine thread; exit status 0. The --device and the port are checked
before anything loads (the socket is bound then and handed to uvicorn, see dsv4.server.bind): an
impossible device or a busy port fails at once, in one line, exit status 1.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from dsv4.async_llm import AsyncLLM
from dsv4.engine_args import EngineArgs, LaunchPlan
from dsv4.logs import log_to_stderr
from dsv4.server.bind import bind_socket

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4 serve",
                                description="OpenAI-compatible server for DeepSeek-V4.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $DSV4_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the directory or repo name)")
    p.add_argument("--reasoning-effort-profile", choices=("auto", "preview", "0731"),
                   default="auto", help="effort table: auto reads the checkpoint's "
                   "encoding/encoding_dsv4.py, else preview")
    p.add_argument("--default-thinking", choices=("on", "off"), default="on",
                   help="chat mode of a request that does not say (no thinking, "
                   "chat_template_kwargs or reasoning_effort field); off suits agent "
                   "frameworks that read only content (default: on, as DeepSeek's API)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no access line per request (method, path, status, tokens, latency)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no load line every 10 s while busy (running, waiting, KV-cache "
                   "usage, tokens/s)")
    EngineArgs.add_cli_args(p, model_positional=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from dsv4 import env
    from dsv4.demo import resolve_model
    from dsv4.device import DeviceError, resolve_device

    try:
        engine_args = EngineArgs.from_cli_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        resolve_device(args.device)  # before anything is built or loaded
    except DeviceError as exc:
        print(f"dsv4 serve: {exc.for_flag('--device')}", file=sys.stderr)
        return 1
    try:
        plan = engine_args.launch_plan()
    except ValueError as exc:
        parser.error(str(exc))
    if not plan.is_driver_node:  # no API server here: this node's ranks serve node 0's driver
        return _serve_worker_node(engine_args, plan)
    api_key = args.api_key or env.api_key()
    sock = bind_socket(args.host, args.port)  # a busy port fails now, not after the load
    try:
        path, default_name = resolve_model(args.model)
    except FileNotFoundError as exc:
        sock.close()
        print(f"dsv4 serve: {exc}", file=sys.stderr)
        return 1
    engine_args.model = str(path)
    log_to_stderr(getattr(logging, args.log_level.upper()))  # the load's KV-cache line
    names = args.served_model_name or [default_name]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while loading: stop cleanly
    try:
        return _serve(args, engine_args, names, api_key, sock)
    except KeyboardInterrupt:
        print("dsv4 serve: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _serve_worker_node(engine_args: EngineArgs, plan: LaunchPlan) -> int:
    from dsv4.demo import resolve_model

    try:
        engine_args.model = str(resolve_model(engine_args.model, announce=False)[0])
    except FileNotFoundError as exc:
        print(f"dsv4 serve: {exc}", file=sys.stderr)
        return 1
    ranks = plan.local_ranks()
    print(f"dsv4 serve: node {plan.node_rank} runs ranks {ranks[0]}..{ranks[-1]} of "
          f"{plan.world_size} as workers of the driver at {plan.host}:{plan.port}",
          file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        engine_args.run_worker_node()
    except KeyboardInterrupt:
        print("dsv4 serve: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a lost driver or peer: say so in one line
        print(f"dsv4 serve: worker node {plan.node_rank} stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("dsv4 serve: worker node stopped by the driver", file=sys.stderr)
    return 0


def _interrupt(sig: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace, engine_args: EngineArgs, names: list[str],
           api_key: str | None, sock: socket.socket) -> int:
    from dsv4.encoding_effort import detect_effort_profile
    from dsv4.server.app import build_app
    from dsv4.tokenizer import Tokenizer

    path = engine_args.model_path()
    profile = args.reasoning_effort_profile
    if profile == "auto":
        profile = detect_effort_profile(path)
    print(f"dsv4 serve: loading {path} ...", file=sys.stderr, flush=True)
    try:
        tokenizer = Tokenizer.from_pretrained(path)
        llm = AsyncLLM.from_engine_args(engine_args, progress=True,
                                        eos_token_id=tokenizer.eos_token_id)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dsv4 serve: cannot load {path}: {exc}", file=sys.stderr)
        return 1
    try:
        app = build_app(llm, tokenizer, names, api_key=api_key, effort_profile=profile,
                        model_root=str(path), default_thinking=args.default_thinking == "on",
                        log_requests=not args.disable_log_requests,
                        log_stats=not args.disable_log_stats)
        # uvicorn's access log stays off: dsv4.access replaces it, with token counts
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=5, access_log=False,
                                log_config=_log_config(args.log_level))
        banner = (f"model: {', '.join(names)}  max_model_len: {llm.max_model_len}  "
                  f"effort profile: {profile}  thinking by default: {args.default_thinking}  "
                  f"api key: {'required' if api_key else 'none'}")
        _Server(config, banner, llm).run(sockets=[sock])
    finally:
        llm.shutdown()
    failure = llm.failure()
    if failure:
        print(f"dsv4 serve: stopped: {failure}", file=sys.stderr)
        return 1
    print("dsv4 serve: stopped", file=sys.stderr)
    return 0


def _log_config(level: str) -> dict:
    """uvicorn's logging setup plus the dsv4 loggers (access, stats, errors) on its stderr
    handler and format, at --log-level; without it their INFO lines would go nowhere. They
    still propagate: the root logger has no handler in `dsv4 serve` (nothing prints twice), and
    whoever adds one there (a test's log capture, an embedding app) sees every record."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dsv4"] = {"handlers": ["default"], "level": level.upper(),
                                 "propagate": True}
    return config


class _Server(uvicorn.Server):
    """uvicorn.Server that prints the URL once the socket is bound (port 0 resolved)."""

    def __init__(self, config: uvicorn.Config, banner: str, llm: AsyncLLM) -> None:
        super().__init__(config)
        self.banner, self.llm = banner, llm

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        print(f"dsv4 serve: ready at http://{shown}:{port}/v1  {self.banner}", flush=True)

    async def on_tick(self, counter: int) -> bool:
        # a worker rank that died takes the server down (after in-flight requests have failed)
        if not self.should_exit and self.llm.failure():
            logging.getLogger("dsv4.server").error("engine failed: %s; shutting down",
                                                   self.llm.failure())
            self.should_exit = True
            self.llm.begin_shutdown()
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # as uvicorn's, minus re-raising the signal after shutdown: we exit 0 by ourselves
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for running requests
        else:
            self.should_exit = True
            # requests in flight end now: streams with an error event and [DONE], the others
            # with a 503, so connections close before the graceful-shutdown timeout
            self.llm.begin_shutdown()
