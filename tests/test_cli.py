"""`dsv4 generate` end to end on a tiny checkpoint with the real tokenizer's vocabulary;
`dsv4 --version`; a --device this torch cannot provide fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from dsv4.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dsv4.model import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("cli") / "ck", tiny_config(vocab_size=129280),
                            tokenizer=False)


def test_generate_plain_and_chat(checkpoint, capsys):
    base = ["generate", "--model", str(checkpoint), "--device", "cpu", "--max-tokens", "3",
            "--max-model-len", "128"]
    assert main([*base, "Hello", "Bonjour"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in lines] == ["'Hello'", "'Bonjour'"]
    assert main([*base, "--chat", "--no-thinking", "Hello"]) == 0
    assert capsys.readouterr().out.startswith("'Hello' -> ")


def test_generate_dtype_flag_reaches_the_model(checkpoint, capsys, monkeypatch):
    import torch

    from dsv4 import llm as llm_mod

    seen = []
    real = llm_mod.LLM._init

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.engine.model.compute_dtype)

    monkeypatch.setattr(llm_mod.LLM, "_init", spy)
    base = ["generate", "--model", str(checkpoint), "--device", "cpu", "--max-tokens", "2",
            "--max-model-len", "128", "Hello"]
    assert main([*base, "--dtype", "float64"]) == 0
    assert main(base) == 0
    assert seen == [torch.float64, torch.float32]
    assert capsys.readouterr().out.startswith("'Hello' -> ")


def test_generate_rejects_bad_flags(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--no-thinking", "Hello"])
    assert exc.value.code == 2
    assert "--no-thinking needs --chat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(checkpoint), "--temperature", "-1", "Hello"])
    assert "temperature" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def _dsv4(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m dsv4 ARGS` from the repository root (this checkout's dsv4)."""
    return subprocess.run([sys.executable, "-m", "dsv4", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_version(capsys):
    import tomllib

    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dsv4 {expected}\n"
    assert main(["-V"]) == 0
    assert capsys.readouterr().out == f"dsv4 {expected}\n"
    done = _dsv4("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"dsv4 {expected}\n", "")


def test_generate_device_cuda_without_cuda_is_one_line(checkpoint, capsys, monkeypatch):
    import torch

    # in-process, with torch made to look like a CPU-only build (holds on GPU machines too)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", str(checkpoint), "--device", "cuda", "Hello"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"dsv4 generate: --device cuda was asked for but this torch build has no CUDA support "
        f"(torch {torch.__version__}); install a CUDA build of torch or use --device cpu\n")
    assert main(["generate", "--model", str(checkpoint), "--device", "gpu", "Hello"]) == 1
    assert capsys.readouterr().err.startswith("dsv4 generate: --device gpu is not a device")


def test_generate_device_cuda_without_cuda_subprocess(checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _dsv4("generate", "--model", str(checkpoint), "--device", "cuda", "Hello")
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # not a traceback
    assert lines[0].startswith("dsv4 generate: --device cuda was asked for but "), lines
