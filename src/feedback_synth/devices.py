"""The one device setting: ``device: auto | cpu | cuda[:N] | mps`` (run config), resolved once per
process and handed to every stage; a stage section's own ``device`` ('' = the run's) overrides it.

``auto`` is CUDA where this process sees a CUDA device, else the CPU (on Kubeflow each task
resolves it on its own pod). Asking for a device the machine lacks is a one-line ConfigError
before any work. Inside the library, helpers follow their module's own device (``module_device``),
as diffusers' pipelines do: a classifier loaded on ``cuda`` is run on ``cuda``, with no hidden
``device="cpu"`` default anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from feedback_synth.errors import ConfigError

AUTO = "auto"


def check_device(device: str, field: str) -> None:
    """``device`` names a torch device that this machine has (``cuda`` on a CPU-only machine, or a
    typo, would otherwise fail with a torch traceback minutes later, in the first stage that uses it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"config field '{field}': '{device}' is not a torch device (auto, cpu, cuda, cuda:1, "
                          f"mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config field '{field}': '{device}' but this machine has no CUDA device "
                              f"(torch {torch.__version__}); use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"config field '{field}': '{device}' but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config field '{field}': '{device}' but MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"config field '{field}': device type '{dev.type}' is not supported (auto, cpu, cuda, mps)")


def resolve_device(device: str, field: str = "device", default: Optional[str] = None) -> str:
    """The concrete torch device that ``device`` means on this machine, checked (``field`` names
    the setting in the error). '' means ``default`` (the run's device), and then ``auto``."""
    device = (device or default or AUTO).strip()
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device, field)
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's weights live on (the CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
