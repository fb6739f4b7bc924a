"""Optional accelerators of the reference decision path, each a
:class:`~dgate_cli.runtime.decisions.Backend` tested against the reference with a tolerance
(measured in ``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import torch

from ..decisions import Backend


def default_backends(device: torch.device | str) -> list[Backend]:
    """The backends :func:`dgate_cli.load` uses on ``device`` unless told otherwise: on a CPU the
    gate kernel, where the install built it (:mod:`.gate_kernel`)."""
    from . import gate_kernel

    kernel = gate_kernel.default() if torch.device(device).type == "cpu" else None
    return [kernel] if kernel is not None else []
