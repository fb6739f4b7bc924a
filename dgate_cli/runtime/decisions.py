"""Decisions: from a stage output to who leaves at a gate, with the exit rule of :mod:`dgate_cli.gates.scores`.

:func:`decide` is the reference: the gate's outputs, the rule's score and class, and ``score >=
threshold`` compared in float32 (thresholds are float32 numbers: see :mod:`dgate_cli.thresholds`).
A backend (:class:`Backend`) may compute the same decision faster for the inputs it supports and
returns None for the others; it is tested against :func:`decide` with a tolerance.

Example:
    >>> import torch
    >>> from dgate_cli.gates.pooling import Pooling
    >>> from dgate_cli.runtime.plan import Gate
    >>> gate = Gate(torch.eye(2), torch.zeros(2), Pooling((1,)), "nc")
    >>> d = decide(gate, torch.tensor([[3.0, 1.0], [1.0, 1.5]]), 1.0, "margin")
    >>> d.leave.tolist(), d.pred.tolist()
    ([True, False], [0, 1])
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from ..gates.scores import gate_scores
from .plan import Gate


class Decision(NamedTuple):
    """One gate's decision on a batch: ``outputs`` ``(N, K)`` float32, ``leave`` ``(N,)`` bool, ``pred``
    ``(N,)``, and ``count``, how many leave, where the decider knows it without a synchronisation.
    Where ``count`` is 0 a decider may leave ``outputs`` and ``pred`` None: nobody needs them."""

    outputs: torch.Tensor | None
    leave: torch.Tensor
    pred: torch.Tensor | None
    count: int | None = None


def decide(gate: Gate, h: torch.Tensor, threshold: float, rule: str) -> Decision:
    """The reference decision of ``gate`` on stage output ``h``: leave where ``score >= threshold``."""
    z = gate(h)
    score, pred = gate_scores(z, rule)
    return Decision(z, score >= threshold, pred)  # a float32 tensor against a Python float: compared in float32


class Backend(Protocol):
    """A faster way to make some decisions. ``decide`` returns None where it does not apply."""

    name: str

    def decide(self, g: int, gate: Gate, h: torch.Tensor, threshold: float, rule: str) -> Decision | None: ...
