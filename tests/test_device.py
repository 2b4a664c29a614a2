"""resolve_device: a device this torch or machine cannot provide fails first, in one clear
message, for the API (LLM, load_model: ValueError) as for the command line (see test_cli)."""

from __future__ import annotations

import pytest
import torch

from dsv4.device import DeviceError, resolve_device


def _torch(monkeypatch, *, built: bool, available: bool, count: int = 0) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.fixture
def cpu_build(monkeypatch):
    _torch(monkeypatch, built=False, available=False)


def test_cpu_and_the_default(cpu_build):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_cuda_when_torch_sees_gpus(monkeypatch):
    _torch(monkeypatch, built=True, available=True, count=2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError) as exc:
        resolve_device("cuda:2")
    assert str(exc.value) == ("device='cuda:2' was asked for but torch sees 2 CUDA devices "
                              "(cuda:0 .. cuda:1)")


def test_cuda_from_a_cpu_only_torch_build(cpu_build):
    with pytest.raises(ValueError) as exc:  # DeviceError is a ValueError
        resolve_device("cuda")
    assert str(exc.value) == (
        f"device='cuda' was asked for but this torch build has no CUDA support (torch "
        f"{torch.__version__}); install a CUDA build of torch or use device='cpu'")
    assert exc.value.for_flag("--device") == (
        f"--device cuda was asked for but this torch build has no CUDA support (torch "
        f"{torch.__version__}); install a CUDA build of torch or use --device cpu")


def test_cuda_build_without_a_visible_gpu(monkeypatch):
    _torch(monkeypatch, built=True, available=False)
    with pytest.raises(DeviceError, match=r"device='cuda' was asked for but torch sees no "
                                          r"CUDA device .*CUDA_VISIBLE_DEVICES, or use "
                                          r"device='cpu'"):
        resolve_device("cuda")


@pytest.mark.parametrize("name", ["gpu", "mps", "meta", "", "cuda:x"])
def test_devices_dsv4_does_not_run_on(cpu_build, name):
    with pytest.raises(DeviceError, match="is not a device dsv4 runs on; use cpu or cuda"):
        resolve_device(name)


def test_llm_and_load_model_fail_before_loading(cpu_build, tiny_checkpoint, monkeypatch):
    from dsv4 import LLM, load_model
    from dsv4.model import loader

    path = tiny_checkpoint()
    opened = []
    monkeypatch.setattr(loader, "checkpoint_files", lambda p: opened.append(p) or [])
    message = r"^device='cuda' was asked for but this torch build has no CUDA support"
    with pytest.raises(ValueError, match=message):
        load_model(path, device="cuda", progress=False)
    with pytest.raises(ValueError, match=message):
        LLM(path, device="cuda")
    assert opened == []  # no weight file was looked at
