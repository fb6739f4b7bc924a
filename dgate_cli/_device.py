"""Choosing a torch device from ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and a dtype by name."""

from __future__ import annotations

import os

import torch

from .errors import SpecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name`` (one of :data:`DTYPES`); a clear error naming ``what`` else.

    Example:
        >>> resolve_dtype("bfloat16")
        torch.bfloat16
    """
    if name not in DTYPES:
        raise SpecError(f"{what} must be one of {', '.join(DTYPES)}, got '{name}'")
    return DTYPES[name]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the device to run on; a clear error if CUDA is asked for and missing.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SpecError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(
                f"--device {device} but torch sees no CUDA device (torch {torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpecError(f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) exist; use cuda:0")
    return dev


def describe(device: torch.device) -> str:
    """A short description of the device: the GPU name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    import platform

    cpu = _cpu_model() or platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def gib(n: float) -> str:
    """A byte count for a message: ``23.5 GB``."""
    return f"{n / 1e9:,.1f} GB" if n < 1e12 else f"{n / 1e12:,.1f} TB"


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
