"""Launch across nodes: the plan each flag set or torchrun environment gives, the errors that
name a bad combination, and a two-node world on loopback (node 1 a `dsv4 serve --node-rank 1`
process, node 0 this test's LLM)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from rank_threads import parallel_test_config

from dsv4.engine.executor import free_port
from dsv4.engine.launch_plan import LaunchError, LaunchPlan
from dsv4.llm import LLM
from dsv4.model import write_checkpoint
from dsv4.sampling_params import SamplingParams


def test_plans():
    one = LaunchPlan.create(4, environ={})
    assert (one.local_ranks(), one.is_driver_node, one.host_store) == ([0, 1, 2, 3], True, True)
    node1 = LaunchPlan.create(8, 2, 1, "10.0.0.1:5000", environ={})
    assert (node1.local_ranks(), node1.is_driver_node, node1.host_store) == (
        [4, 5, 6, 7], False, False)
    assert (node1.host, node1.port) == ("10.0.0.1", 5000)
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "h", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    tr = LaunchPlan.create(4, environ=env)
    assert (tr.local_ranks(), tr.node_rank, tr.nnodes, tr.host_store) == ([3], 1, 2, False)


@pytest.mark.parametrize("args, message", [
    ((8, 3, 0, "h:1"), "do not split evenly over --nnodes 3"),
    ((8, 2, 2, "h:1"), "--node-rank 2 is outside --nnodes 2"),
    ((8, 2, 0, None), "needs --dist-init-addr"),
    ((8, 2, 0, "nohostport"), "must be HOST:PORT"),
])
def test_bad_launch_flags_are_named(args, message):
    with pytest.raises(LaunchError, match=message):
        LaunchPlan.create(*args, environ={})


def test_torchrun_world_must_match_the_layout():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}
    with pytest.raises(LaunchError, match="WORLD_SIZE=4 processes but .* = 2"):
        LaunchPlan.create(2, environ=env)


def test_two_nodes_on_loopback(tmp_path):
    ckpt = str(write_checkpoint(tmp_path / "ckpt", parallel_test_config(), tokenizer=False,
                                seed=7))
    common = dict(device="cpu", dtype=torch.float64, max_model_len=128,
                  kv_cache_memory=16 << 20)
    prompts = [{"prompt_token_ids": list(range(3, 30))}, {"prompt_token_ids": [5, 6]}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, **common).generate(prompts, params)]
    addr = f"127.0.0.1:{free_port()}"
    node1 = subprocess.Popen(
        [sys.executable, "-m", "dsv4", "serve", ckpt, "-tp", "2", "--nnodes", "2",
         "--node-rank", "1", "--dist-init-addr", addr, "--device", "cpu", "--dtype", "float64",
         "--max-model-len", "128", "--kv-cache-memory", "16MiB"],
        stderr=subprocess.PIPE, text=True)
    try:
        llm = LLM(ckpt, **common, tensor_parallel_size=2, nnodes=2, node_rank=0,
                  dist_init_addr=addr)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.engine.shutdown()
        assert node1.wait(timeout=30) == 0
        assert "stopped by the driver" in node1.stderr.read()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    assert got == want


def test_serve_under_torchrun(tmp_path):
    """torchrun starts both ranks; rank 0 serves, rank 1 is its worker; a completion comes back
    and SIGTERM ends every process."""
    ckpt = str(write_checkpoint(tmp_path / "ckpt", parallel_test_config(), tokenizer=False,
                                seed=7))
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dsv4", "serve", ckpt, "-tp", "2", "--device", "cpu", "--port", "0",
         "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--disable-log-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        url = None
        for line in run.stdout:
            found = re.search(r"ready at (http://\S+)/v1", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not start under torchrun"
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "ckpt", "prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            raise
