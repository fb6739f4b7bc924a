"""glibc malloc tuning for inference: reuse freed activation buffers instead of page-faulting new ones.

:func:`tune_malloc` raises glibc's mmap and trim thresholds (as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` would), so the activation buffers a network frees at every layer stay in
the heap for reuse (measured in ``benchmarks/RESULTS.md``); the process keeps its peak heap instead
of returning it to the OS. The ``dgate`` command line applies it at start-up (``DGATE_MALLOC=system``
leaves malloc alone); the library does not: call :func:`tune_malloc` in your own server to get it."""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_tuned = False


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether it applied.

    A no-op (returning False) off Linux, on other C libraries (musl) and where ``mallopt`` refuses.

    Example:
        >>> import dgate_cli
        >>> dgate_cli.tune_malloc()  # doctest: +SKIP
        True
    """
    global _tuned
    if not sys.platform.startswith("linux") or not (0 < mmap_threshold < 2**31 and 0 < trim_threshold < 2**31):
        return False
    try:
        libc = ctypes.CDLL(None)
        getattr(libc, "gnu_get_libc_version")  # glibc only: musl's mallopt is a stub  # noqa: B009
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    _tuned = _tuned or ok
    return ok


def malloc_state() -> str:
    """``tuned`` if :func:`tune_malloc` applied in this process, else ``system``."""
    return "tuned" if _tuned else "system"


def tune_malloc_from_env() -> bool:
    """What the command line does at start-up: tune unless ``DGATE_MALLOC=system``."""
    if os.environ.get("DGATE_MALLOC", "").strip().lower() == "system":
        return False
    return tune_malloc()
