"""The single-sample gate kernel (``_gate1.c``): built with the system C compiler on first use.

One sample's gate in PyTorch is three or four small operations, and right after a stage each costs
10-40 us on a CPU (see ``runtime``): ~90 us a gate, 3-5% of a CIFAR ResNet-56 with two gates. The
kernel does the pooling, the product, the bias and the exit score in one call (~15-30 us).

It is compiled once per source, compiler and platform into ``$DGATE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/dgate`` or ``~/.cache/dgate``) - written under a temporary name, then renamed -
and loaded with ctypes (only a file owned by this user and not writable by anyone else). Where that
fails (no compiler, a read-only cache, not Linux or macOS) or ``DGATE_NATIVE=0`` is set,
:func:`kernel` returns None and the runtime uses PyTorch: the same decisions up to float rounding.
:func:`status` says which, for ``dgate bench``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from ._io import atomic_path

SOURCE = Path(__file__).with_name("_gate1.c")
# fixed float32 arithmetic (no -ffast-math, no fused multiply-add contraction): the same bits on
# every build, so gate_outputs and the runtime, which both call the kernel, agree exactly
FLAGS = ["-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]


class Kernel(NamedTuple):
    gate: ctypes._CFuncPtr  # float dgate_gate1(x, c, h, w, s, nhwc, weights, bias, k, rule)
    outputs: ctypes._CFuncPtr  # int dgate_outputs(dst, k)


_state: dict[str, object] = {}  # "kernel": Kernel | None, "status": str


def kernel() -> Kernel | None:
    """The compiled kernel, or None where it cannot be had (see :func:`status`). Built once per
    process, on the first call."""
    if "status" not in _state:
        _state["kernel"], _state["status"] = _load()
    return _state["kernel"]  # type: ignore[return-value]


def status() -> str:
    """``on``, or ``off (why)``: whether single samples use the kernel in this process."""
    kernel()
    return str(_state["status"])


def reset() -> None:
    """Forget the loaded kernel (tests; the next :func:`kernel` call looks again)."""
    _state.clear()


def _load() -> tuple[Kernel | None, str]:
    if os.environ.get("DGATE_NATIVE", "").strip().lower() in ("0", "off", "false", "no"):
        return None, "off (DGATE_NATIVE=0)"
    if sys.platform not in ("linux", "darwin"):
        return None, f"off (not built on {sys.platform})"
    cc = shlex.split(os.environ.get("CC") or "cc")  # CC may carry arguments ("ccache gcc")
    if not cc or shutil.which(cc[0]) is None:
        return None, f"off (no C compiler: {' '.join(cc)!r} not found; install one or set CC)"
    try:
        return _build(cc), "on"
    except Exception as e:  # noqa: BLE001 - whatever goes wrong here, PyTorch does the work instead
        return None, f"off ({e})"


def _build(cc: list[str]) -> Kernel:
    """Compile (once per source, compiler and platform) and load the kernel; raises with the reason."""
    source = SOURCE.read_bytes()
    tag = " ".join([*cc, *FLAGS, sys.platform, platform.machine()])
    digest = hashlib.sha256(source + tag.encode()).hexdigest()[:16]
    cache = _cache_dir()
    lib = cache / f"gate1-{digest}.so"
    if not lib.exists():
        with atomic_path(lib) as tmp:  # a failed or interrupted build leaves nothing behind
            done = subprocess.run(
                [*cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                why = next((ln for ln in lines if "error" in ln), lines[0] if lines else "no message")
                raise RuntimeError(f"{' '.join(cc)} failed: {why.strip()[:300]}")
    st = lib.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o002):
        raise RuntimeError(f"{lib} is not owned by this user or is world-writable; remove it")
    dll = ctypes.CDLL(str(lib))
    gate = dll.dgate_gate1
    gate.restype = ctypes.c_float
    gate.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 5, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    outputs = dll.dgate_outputs
    outputs.restype = ctypes.c_int
    outputs.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return Kernel(gate, outputs)


def _cache_dir() -> Path:
    if os.environ.get("DGATE_CACHE_DIR"):
        return Path(os.environ["DGATE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dgate"
