"""The gate kernel (``_gates.c``): built with the system C compiler on first use.

A gate in PyTorch is three to six small operations (pool, product, bias, score, compare, nonzero),
and right after a stage each costs 10-40 us on a CPU (see ``runtime``): ~90 us a gate for one
sample, ~170-280 us for a batch of 32 CIFAR images, 4-6% of a ResNet-56 with nine gates. The kernel
does the pooling, the product, the bias, the exit score and the comparison with the threshold in
one call: ~10-30 us for one sample, ~90-180 us for 32 (most of it reading the stage output).

It is compiled once per source, compiler, Python and platform into ``$DGATE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/dgate`` or ``~/.cache/dgate``) - written under a temporary name, then renamed -
and loaded as a CPython extension module, or with ctypes where Python's headers are missing or that fails
(only a file owned by this user and not world-writable). Where that
fails (no compiler, a read-only cache, not Linux or macOS) or ``DGATE_NATIVE=0`` is set,
:func:`kernel` returns None and the runtime uses PyTorch: the same decisions up to float rounding.
:func:`status` says which, for ``dgate bench``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ..._io import atomic_path

SOURCE = Path(__file__).with_name("_gates.c")
# fixed float32 arithmetic (no -ffast-math, no fused multiply-add contraction): the same bits on
# every build and instruction set, so gate_outputs and the runtime, which both call the kernel,
# agree exactly; -O3 vectorises the pooling loops
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]


class Kernel(NamedTuple):
    gate: Callable[..., float]  # float dgate_gate1(x, params): one sample's exit score
    outputs: Callable[..., int]  # int dgate_outputs(dst, k): the k outputs of this thread's last gate() call
    gates: Callable[..., int]  # int dgate_gates(x, n, params, threshold, z, leave): outputs, who leaves, how many


class _Params(ctypes.Structure):  # struct dgate_gate
    _fields_ = [
        ("wt", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        *[(name, ctypes.c_int) for name in ("c", "h", "w", "s", "nhwc", "k", "rule")],
    ]


class Gate(NamedTuple):
    """One gate bound to the kernel for one stage output shape and layout.

    ``one(x, address)`` scores one sample at data pointer ``x`` (its outputs then go through
    :func:`outputs`); ``many(x, n, address, threshold, z, leave)`` fills ``z`` ``(n, k)`` float32
    and ``leave`` ``(n,)`` bytes and returns how many leave (-1: out of memory). Few arguments:
    each costs ~1 us right after a stage through ctypes (less through the extension module)."""

    one: Callable[..., float]
    many: Callable[..., int]
    outputs: Callable[..., int]
    address: int  # of the parameters
    k: int
    keep: tuple  # the parameters and the storages they point into: alive as long as this is


def bind(kernel: Kernel, weight, bias, shape: tuple[int, ...], s: int, nhwc: bool, rule: int) -> Gate:
    """Bind gate weights (a dense float32 CPU tensor ``(k, s*s*C)`` in ``(s, s, C)`` order), bias
    (``(k,)``) and exit rule (0: max, 1: margin) to float32 CPU stage outputs of ``shape``
    ``(N, C, H, W)`` (``H`` and ``W`` positive multiples of ``s``), dense in NCHW or (``nhwc``)
    NHWC order. The caller checks these: the kernel reads raw memory."""
    _, c, h, w = shape
    params = _Params(weight.data_ptr(), bias.data_ptr(), c, h, w, s, int(nhwc), weight.shape[0], rule)
    keep = (params, weight.untyped_storage(), bias.untyped_storage())
    k = weight.shape[0]
    return Gate(kernel.gate, kernel.gates, kernel.outputs, ctypes.addressof(params), k, keep)


_state: dict[str, object] = {}  # "kernel": Kernel | None, "status": str


def kernel() -> Kernel | None:
    """The compiled kernel, or None where it cannot be had (see :func:`status`). Built once per
    process, on the first call."""
    if "status" not in _state:
        _state["kernel"], _state["status"] = _load()
    return _state["kernel"]  # type: ignore[return-value]


def status() -> str:
    """``on``, ``on (through ctypes: why)`` or ``off (why)``: whether the gates use the kernel in
    this process, and how it is called."""
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
        return _build(cc)
    except Exception as e:  # noqa: BLE001 - whatever goes wrong here, PyTorch does the work instead
        return None, f"off ({e})"


def _build(cc: list[str]) -> tuple[Kernel, str]:
    """Compile (once per source, compiler, flags, Python and platform) and load the kernel: as a
    CPython extension module where Python's headers are, else - or if that fails - as a plain
    library through ctypes (each call ~5-10 us dearer right after a stage). Raises with the reason."""
    paths = sysconfig.get_paths()
    include = paths.get("include") or ""
    if include and Path(include, "Python.h").is_file():
        flags = ["-DDGATE_PYTHON", f"-I{include}"]
        if paths.get("platinclude") and paths["platinclude"] != include:  # pyconfig.h may live there
            flags.append(f"-I{paths['platinclude']}")
        if sys.platform == "darwin":  # the interpreter's symbols are found when the module loads
            flags += ["-undefined", "dynamic_lookup"]
        try:
            module = _load_extension(_compile(cc, flags))
            return Kernel(module.gate, module.outputs, module.gates), "on"
        except Exception as e:  # noqa: BLE001 - ctypes next
            why = f"the extension module failed: {e}"
    else:
        why = f"no Python.h in {include!r}"
    dll = ctypes.CDLL(str(_compile(cc, [])))
    gate = dll.dgate_gate1
    gate.restype = ctypes.c_float
    gate.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    outputs = dll.dgate_outputs
    outputs.restype = ctypes.c_int
    outputs.argtypes = [ctypes.c_void_p, ctypes.c_int]
    gates = dll.dgate_gates
    gates.restype = ctypes.c_int
    gates.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    return Kernel(gate, outputs, gates), f"on (through ctypes: {why})"


def _compile(cc: list[str], extra: list[str]) -> Path:
    """The cached library for these flags, compiled first if it is not there; raises with the
    compiler's error line, or if the file is not ours or is writable by anyone."""
    flags = [*FLAGS, *extra]
    abi = (sysconfig.get_config_var("EXT_SUFFIX") or "") if extra else ""  # an extension is Python-specific
    tag = " ".join([*cc, *flags, sys.platform, platform.machine(), abi])
    digest = hashlib.sha256(SOURCE.read_bytes() + tag.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"gates-{digest}.so"
    if not lib.exists():
        with atomic_path(lib) as tmp:  # a failed or interrupted build leaves nothing behind
            done = subprocess.run(
                [*cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120, check=False
            )
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                why = next((ln for ln in lines if "error" in ln), lines[0] if lines else "no message")
                raise RuntimeError(f"{' '.join(cc)} failed: {why.strip()[:300]}")
    st = lib.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o002):
        raise RuntimeError(f"{lib} is not owned by this user or is world-writable; remove it")
    return lib


def _load_extension(lib: Path):
    loader = importlib.machinery.ExtensionFileLoader("_dgate_gates", str(lib))
    spec = importlib.util.spec_from_file_location("_dgate_gates", str(lib), loader=loader)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    loader.exec_module(module)
    return module


def _cache_dir() -> Path:
    if os.environ.get("DGATE_CACHE_DIR"):
        return Path(os.environ["DGATE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dgate"
