"""The gate kernel backend: a gate's pooling, product, bias, exit rule and threshold in one C call.

Built by the install as the extension module ``_gates`` (``setup.py``; optional: without a C
compiler or Python's headers the package installs without it and the reference path runs).
It answers for CPU float32 stage outputs in NCHW or NHWC order, pooled by one average grid of
even windows, under the ``max`` and ``margin`` rules; for everything else it returns None and the
reference (:func:`dgate_cli.runtime.decisions.decide`) decides. Its results equal the reference's
up to float rounding (tested with a tolerance); its gain is measured in ``benchmarks/RESULTS.md``.
``DGATE_KERNEL=0`` turns it off.

Example:
    >>> status() in ("on", "off (not built: no C compiler or Python headers at install time)", "off (DGATE_KERNEL=0)")
    True
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from ..decisions import Decision
from ..plan import Gate

try:
    from . import _gates  # type: ignore[attr-defined]
except ImportError:  # built without a compiler or Python's headers
    _gates = None

RULES = {"max": 0, "margin": 1}
_TRUE = torch.tensor([True])
_STAYS = Decision(None, torch.tensor([False]), None, 0)  # type: ignore[arg-type]  # one sample that does not leave
MAX_VALUES = (
    1 << 20
)  # the largest batch (N * C * H * W) the kernel pools, on one thread; PyTorch pools larger ones on all


class _Params(ctypes.Structure):  # struct dgate_gate in _gates.c
    _fields_ = [
        ("wt", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        *[(name, ctypes.c_int) for name in ("c", "h", "w", "s", "nhwc", "k", "rule")],
    ]


def status() -> str:
    """``on``, or ``off (why)``: whether :func:`default` gives the kernel in this process."""
    if _gates is None:
        return "off (not built: no C compiler or Python headers at install time)"
    if os.environ.get("DGATE_KERNEL", "").strip().lower() in ("0", "off", "false", "no"):
        return "off (DGATE_KERNEL=0)"
    return "on"


def default() -> GateKernel | None:
    """The kernel backend where it is built and not turned off, else None."""
    return GateKernel() if status() == "on" else None


class GateKernel:
    """The backend: :meth:`decide` for the stage outputs the kernel supports, None for the others."""

    name = "gate kernel"

    def __init__(self) -> None:
        if _gates is None:
            raise RuntimeError(status())
        self._bound: dict[tuple, tuple] = {}  # per gate and sample layout: (params, K, what they point into, signature)

    def decide(self, g: int, gate: Gate, h: torch.Tensor, threshold: float, rule: str) -> Decision | None:
        n = h.shape[0]
        if n > 1 and h.numel() > MAX_VALUES:  # PyTorch pools large batches on every thread
            return None
        # the binding depends on one sample's shape and layout, not on the batch size
        key = (g, h.shape[1:], h.stride(), h.dtype, h.is_cpu, h.requires_grad, rule)
        bound = self._bound.get(key)
        w, b = gate.weight, gate.bias
        signature = (w.data_ptr(), b.data_ptr(), _version(w), _version(b))  # changed by any edit of the gate
        if bound is None or bound[3] != signature:
            if len(self._bound) > 1024:  # one entry per gate and sample layout seen: keep it bounded
                self._bound.clear()
            bound = self._bound[key] = (*self._bind(gate, h, rule), signature)
        if bound[0] is None:
            return None
        address, k = bound[0], bound[1]
        if n == 1:
            if _gates.gate(h.data_ptr(), address) < threshold:
                return _STAYS  # nobody leaves: no outputs or classes needed
            z = np.empty((1, k), dtype=np.float32)
            if _gates.outputs(z.ctypes.data, k) != k:
                raise MemoryError("the gate kernel has no outputs (out of memory?); set DGATE_KERNEL=0")
            return Decision(torch.from_numpy(z), _TRUE, torch.from_numpy(z.argmax(1)), 1)
        z = np.empty((n, k), dtype=np.float32)
        leave = np.empty(n, dtype=np.bool_)  # one byte each, 0 or 1: the kernel's unsigned chars
        count = _gates.gates(h.data_ptr(), n, address, threshold, z.ctypes.data, leave.ctypes.data)
        if count < 0:
            raise MemoryError("the gate kernel could not allocate its buffer (out of memory?); set DGATE_KERNEL=0")
        pred = torch.from_numpy(z.argmax(1)) if count else None
        return Decision(torch.from_numpy(z), torch.from_numpy(leave), pred, count)

    @staticmethod
    def _bind(gate: Gate, h: torch.Tensor, rule: str) -> tuple:
        """The kernel's parameters for ``gate`` on outputs like ``h``: (their address, K, what they
        point into), or (None, 0, None) where the kernel does not apply."""
        pooling = gate.pooling
        if (
            rule not in RULES
            or gate.layout != "nchw"
            or pooling.ops != ("avg",)
            or len(pooling.sizes) != 1
            or not h.is_cpu
            or h.dtype != torch.float32
            or h.dim() != 4
            or h.requires_grad
            or not h.numel()
            or gate.weight.dtype != torch.float32
            or not gate.weight.is_cpu
        ):
            return None, 0, None
        s = pooling.sizes[0]
        _, c, height, width = h.shape
        nhwc = not h.is_contiguous()
        if height % s or width % s or (nhwc and not h.is_contiguous(memory_format=torch.channels_last)):
            return None, 0, None
        w, b = gate.weight, gate.bias
        if w.shape[1] != c * s * s:
            return None, 0, None
        # the weights in (s, s, C) order, the kernel's; the parameters point into these copies
        wt = w.detach().view(w.shape[0], c, s, s).permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous().clone()
        bc = b.detach().contiguous().clone()
        params = _Params(wt.data_ptr(), bc.data_ptr(), c, height, width, s, int(nhwc), w.shape[0], RULES[rule])
        return ctypes.addressof(params), w.shape[0], (params, wt, bc)

    def __getstate__(self) -> dict:  # bindings point into this process's memory
        return {}

    def __setstate__(self, state: dict) -> None:
        self._bound = {}


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version
