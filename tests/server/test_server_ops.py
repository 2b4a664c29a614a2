"""Operating `dsv4 serve`: a busy port or an impossible --device failing at once in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from server_harness import checkpoint

from dsv4.server.bind import bind_socket

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsv4", "serve", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DSV4_API_KEY"}


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
