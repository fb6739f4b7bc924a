"""What a gated run returns: :class:`GatedOutput`, per sample in input order.

The steps of a run hand back the samples that left at each exit as :class:`Left` pieces;
:func:`assemble` puts them back in input order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class GatedOutput(NamedTuple):
    """Per-sample results of a :class:`GatedModel` forward pass.

    Attributes:
        logits: ``(N, K)``: the gate's outputs (distances or logits) for samples that left at a
            gate, the backbone's logits for the others.
        pred: ``(N,)`` predicted class.
        exit: ``(N,)`` exit index: ``g`` for gate ``g``, ``len(gates)`` for the backbone's head.
    """

    logits: torch.Tensor
    pred: torch.Tensor
    exit: torch.Tensor


class Left(NamedTuple):
    """Samples that finished at one exit: their exit index, rows (positions in the input), outputs, classes."""

    exit: int
    rows: torch.Tensor | None  # None: every input row, in order
    outputs: torch.Tensor
    pred: torch.Tensor


def assemble(n: int, left: list[Left], device: torch.device) -> GatedOutput:
    """Put the per-exit results back into input order."""
    if len(left) == 1:  # everyone left at one exit (rows None, or all of them in order)
        d = left[0]
        return GatedOutput(d.outputs, d.pred, torch.full((n,), d.exit, dtype=torch.long, device=device))
    rows = torch.cat([d.rows for d in left])
    order = torch.empty_like(rows)
    order[rows] = torch.arange(n, device=rows.device)  # position of input i among the concatenated rows
    exits = torch.cat([torch.full((d.rows.numel(),), d.exit, dtype=torch.long, device=rows.device) for d in left])
    return GatedOutput(
        torch.cat([d.outputs for d in left])[order], torch.cat([d.pred for d in left])[order], exits[order]
    )
