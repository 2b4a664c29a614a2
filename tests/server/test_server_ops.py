"""Operating `dsv4 serve`: the access line per request, the load line while busy (and neither
when switched off), a busy port or an impossible --device failing at once in one line."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from server_harness import MODEL, ServerHandle, checkpoint, start_uvicorn

from dsv4.server import launch
from dsv4.server.app import build_app
from dsv4.server.bind import bind_socket
from dsv4.server.metrics import RequestStats, ServerMetrics
from dsv4.server.stats_logger import StatsLogger

INTERVAL = 0.2
REPO = Path(__file__).resolve().parents[2]
ACCESS = re.compile(r'^127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/1\.1" '
                    r"(?P<status>\d{3})(?: prompt_tokens=(?P<prompt>\d+) "
                    r"completion_tokens=(?P<completion>\d+))? latency=\d+\.\d{3}s$")
STATS = re.compile(r"^running: (?P<running>\d+) reqs, waiting: (?P<waiting>\d+) reqs, "
                   r"KV cache usage: \d+\.\d%, prompt throughput: (?P<prompt>\d+\.\d) tokens/s, "
                   r"generation throughput: (?P<generation>\d+\.\d) tokens/s"
                   r"(, prefix cache hit rate: (?P<hit_rate>\d+\.\d)%)?"
                   r"(, spec decode: mean accepted length (?P<spec_len>\d+\.\d\d), "
                   r"acceptance (?P<spec_rate>\d+\.\d)%)?$")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    handle = ServerHandle(tmp_path_factory.getbasetemp(), app_args={"stats_interval": INTERVAL})
    yield handle
    handle.stop()


def _messages(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _chat(http: httpx.Client, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    return http.post("/v1/chat/completions", json=body)


def test_access_line_per_request(srv, caplog):
    caplog.set_level(logging.INFO, logger="dsv4.access")
    with srv.http() as http:
        usage = _chat(http, max_tokens=3).json()["usage"]
        with http.stream("POST", "/v1/completions",
                         json={"model": MODEL, "prompt": "Hello there", "max_tokens": 4,
                               "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        streamed = httpx.Response(200, content=events[-1][6:]).json()["usage"]
        assert http.get("/v1/models", params={"x": "1"}).status_code == 200
        assert _chat(http, model="no-such-model").status_code == 404
    assert _wait_for(lambda: len(_messages(caplog, "dsv4.access")) >= 4)
    lines = [ACCESS.match(m) for m in _messages(caplog, "dsv4.access")]
    assert all(lines), _messages(caplog, "dsv4.access")
    got = [(m["method"], m["target"], m["status"], m["prompt"], m["completion"]) for m in lines]
    assert got == [
        ("POST", "/v1/chat/completions", "200", str(usage["prompt_tokens"]), "3"),
        ("POST", "/v1/completions", "200", str(streamed["prompt_tokens"]), "4"),
        ("GET", "/v1/models?x=1", "200", None, None),
        ("POST", "/v1/chat/completions", "404", None, None),
    ]


def test_stats_line_while_busy_and_silence_when_idle(srv, caplog):
    caplog.set_level(logging.INFO, logger="dsv4.stats")
    with srv.http() as http:
        assert _chat(http, max_tokens=8).status_code == 200
    assert srv.wait_idle()

    def stats() -> list[re.Match]:
        found = [STATS.match(m) for m in _messages(caplog, "dsv4.stats")]
        assert all(found), _messages(caplog, "dsv4.stats")
        return found

    # a line showing the tokens, then one idle line (the drain), then nothing while idle
    assert _wait_for(lambda: any(float(m["generation"]) > 0 for m in stats()))
    assert _wait_for(lambda: stats()[-1].group("running", "waiting", "prompt", "generation")
                     == ("0", "0", "0.0", "0.0"))
    count = len(stats())
    time.sleep(5 * INTERVAL)
    assert len(stats()) == count


def test_stats_logger_line_and_rates():
    metrics = ServerMetrics("m")
    gauges = SimpleNamespace(num_running=2, num_waiting=1, kv_cache_usage=0.125,
                             prefix_cache_queries=400, prefix_cache_hits=100,
                             spec_num_drafts=10, spec_draft_tokens=20, spec_accepted_tokens=15)

    async def get_stats():
        return gauges

    logger = StatsLogger(metrics, get_stats, interval=10.0)
    stats = RequestStats(metrics, 30)
    stats.on_tokens(5)
    line = asyncio.run(logger.log_once())
    m = STATS.match(line)
    assert m and m.group("running", "waiting") == ("2", "1") and "usage: 12.5%" in line
    assert float(m["prompt"]) > 0 and float(m["generation"]) > 0
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (30, 5)
    assert m["hit_rate"] == "25.0"  # hits / queries since the last line
    # 10 verifying rows accepted 15 of 20 drafts: 2.5 tokens a row-step
    assert (m["spec_len"], m["spec_rate"]) == ("2.50", "75.0")
    gauges.num_running = gauges.num_waiting = 0
    assert asyncio.run(logger.log_once()) is not None  # the drain line
    assert asyncio.run(logger.log_once()) is None  # idle: silent
    with pytest.raises(ValueError, match="interval"):
        StatsLogger(metrics, get_stats, interval=0)


def test_logging_switched_off(srv, caplog):
    caplog.set_level(logging.INFO, logger="dsv4")
    app = build_app(srv.llm, srv.tokenizer, MODEL, log_requests=False, log_stats=False,
                    stats_interval=INTERVAL)
    server, thread, url = start_uvicorn(app)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert _chat(http, max_tokens=4).status_code == 200
        with srv.http() as http:
            assert _chat(http, max_tokens=4).status_code == 200
        # the module's server, logging on, wrote its access line (from its own thread)...
        assert _wait_for(lambda: any(r.name == "dsv4.access" and r.thread == srv.thread.ident
                                     for r in caplog.records))
        time.sleep(5 * INTERVAL)
    finally:
        server.should_exit = True
        thread.join(10)
    # ...while the app with both switched off logged nothing from its thread
    assert [r.getMessage() for r in caplog.records if r.thread == thread.ident
            and r.name in ("dsv4.access", "dsv4.stats")] == []
    args = launch.build_parser().parse_args(["--disable-log-requests", "--disable-log-stats"])
    assert args.disable_log_requests and args.disable_log_stats


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsv4", "serve", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DSV4_API_KEY"}


def test_serve_prints_access_lines(tmp_path_factory):
    path = checkpoint(tmp_path_factory.getbasetemp())
    proc = subprocess.Popen(_serve(str(path), "--port", "0", "--device", "cpu",
                                   "--max-model-len", "1024", "--kv-cache-memory", "64MiB",
                                   "--served-model-name", "m", "--disable-log-stats"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        line = proc.stdout.readline()
        assert "ready at http://127.0.0.1:" in line, proc.stderr.read()
        base = line.split("ready at ")[1].split()[0].removesuffix("/v1")
        with httpx.Client(base_url=base, timeout=60) as http:
            assert _chat(http, model="m", max_tokens=2).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.search(r'^INFO: +127\.0\.0\.1:\d+ "POST /v1/chat/completions HTTP/1\.1" 200 '
                     r"prompt_tokens=\d+ completion_tokens=2 latency=", err, re.M), err


def test_busy_port_fails_at_once_before_loading(tmp_path_factory):
    path = checkpoint(tmp_path_factory.getbasetemp())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(_serve(str(path), "--port", str(port), "--device", "cpu"),
                              cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"dsv4 serve: port {port} on 127.0.0.1 is already in use (another server?); stop it, "
        "or pick another with --port (--port 0: any free port)"]  # nothing loaded first


def test_bind_socket_holds_the_port_without_listening():
    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with pytest.raises(ConnectionRefusedError):  # while loading: refused, not a hang
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        sock.listen()
        with pytest.raises(SystemExit, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_socket("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(SystemExit, match="is not a TCP port"):
        bind_socket("127.0.0.1", 70000)


def test_serve_device_cuda_without_cuda_is_one_line(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = checkpoint(tmp_path_factory.getbasetemp())
    done = subprocess.run(_serve(str(path), "--device", "cuda"), cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=_env())
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dsv4 serve: --device cuda was asked for but "), lines
