"""resolve_device: the device a user asked for -> torch.device, or one error that says what to do.

dsv4 runs on the CPU or on CUDA GPUs. ``None`` means CUDA when torch sees a GPU, else the CPU.
Asking for CUDA from a torch build without CUDA (a ``+cpu`` wheel), from a machine where torch
sees no GPU, or for a GPU index that does not exist fails here, before anything is loaded, with
a ``DeviceError`` (a ValueError) instead of torch's assertion deep inside the loader.

The same check serves the API (``LLM(device=...)``, ``load_model``) and the command line; the
message names the device as the caller spelled it: ``str(exc)`` as a keyword argument
(``device='cuda'``), ``exc.for_flag("--device")`` as a flag (``--device cuda``).
"""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(ValueError):
    """A device this torch or this machine cannot provide."""

    def __init__(self, name: str, template: str) -> None:
        # template: {asked} is the request as the caller spelled it, {cpu} the CPU likewise
        self.name, self.template = name, template
        super().__init__(self._render(f"device={name!r}", "device='cpu'"))

    def for_flag(self, flag: str) -> str:
        """The message for a command-line flag, e.g. ``--device cuda was asked for but ...``."""
        return self._render(f"{flag} {self.name}", f"{flag} cpu")

    def _render(self, asked: str, cpu: str) -> str:
        return self.template.format(asked=asked, cpu=cpu)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> that
    device once checked usable here; anything else raises DeviceError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceError(text, "{asked} is not a device dsv4 runs on; use cpu or cuda "
                                "(cuda:N for one GPU)")
    if device.type == "cpu":
        return device
    if not torch.backends.cuda.is_built():
        raise DeviceError(text, "{asked} was asked for but this torch build has no CUDA "
                                f"support (torch {torch.__version__}); install a CUDA build "
                                "of torch or use {cpu}")
    if not torch.cuda.is_available():
        raise DeviceError(text, "{asked} was asked for but torch sees no CUDA device (torch "
                                f"{torch.__version__}, CUDA {torch.version.cuda}); check the "
                                "driver and CUDA_VISIBLE_DEVICES, or use {cpu}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(text, "{asked} was asked for but torch sees "
                                f"{count} CUDA device{'s' if count != 1 else ''} "
                                f"(cuda:0 .. cuda:{count - 1})")
    return device
