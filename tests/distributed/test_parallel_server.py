"""`dsv4 serve -tp 2` as a user starts it: real worker processes; a worker killed mid-stream
fails the stream, the server reports itself unhealthy and exits naming the rank, and no process
is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rank_threads import parallel_test_config

from dsv4.model import write_checkpoint


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str, list[int]]:
    """A `dsv4 serve -tp 2` process, its URL and its one worker's pid."""
    ckpt = write_checkpoint(tmp_path / "ckpt", parallel_test_config(), tokenizer=False, seed=6)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "dsv4", "serve", str(ckpt), "-tp", "2", "--device", "cpu",
         "--port", "0", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
         "--dist-timeout", "10", "--disable-log-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        found = re.search(r"ready at (http://\S+)/v1", line)
        url = found and found.group(1)
    if not url:
        server.kill()
        raise AssertionError(server.stderr.read())
    workers = [p for p in _children(server.pid) if "spawn_main" in
               Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    return server, url, workers


@pytest.fixture
def served(tmp_path):
    server, url, workers = _start(tmp_path)
    yield server, url, workers
    if server.poll() is None:
        server.kill()
        server.wait()
    assert not any(_alive(p) for p in workers), "a worker outlived the server"


pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds workers in /proc")


def test_killed_worker_fails_the_stream_and_stops_the_server(served):
    server, url, workers = served
    assert len(workers) == 1
    client = httpx.Client(base_url=url, timeout=60)
    assert client.get("/health").status_code == 200
    events = []
    body = {"model": "ckpt", "prompt": list(range(1, 40)), "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:
                os.kill(workers[0], signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "error" in error and "rank 1" in error["error"]["message"]
    assert server.wait(timeout=30) == 1
    assert "worker rank 1 exited" in server.stderr.read()


def test_sigterm_stops_server_and_workers(served):
    server, url, workers = served
    assert httpx.get(f"{url}/health").status_code == 200
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
