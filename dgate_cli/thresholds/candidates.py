"""Choosing among calibration candidates: each candidate (a single network's exit rule, a learned
policy, a cascade variant) is searched for the target, and the cheapest in MACs that reaches it is kept."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from ..errors import SpecError, TargetUnreachableError
from .guarantees import search_confident, search_reserved
from .outcomes import GateOutcomes, OperatingPoint, in_macs
from .search import lagrangian_path, search


class Tried(NamedTuple):
    """One candidate of a calibration (exits on their rule, a learned policy, a cascade variant) at the target.

    Attributes:
        key: what the candidate is (for a single network, its policy's lambda or None).
        macs: its outcomes, costs in MACs.
        searched: what the search minimised (MACs plus each open gate's overhead).
        path: the search's Lagrangian path on ``searched`` (shared with the frontier).
        found: the point found on ``searched`` (None: the target is out of its reach).
        point: ``found`` with its cost in MACs.
    """

    key: Any
    macs: GateOutcomes
    searched: GateOutcomes
    path: list[torch.Tensor]
    found: OperatingPoint | None
    point: OperatingPoint | None
    error: TargetUnreachableError | None


def priced(oc: GateOutcomes, gate_overhead: float) -> GateOutcomes:
    """``oc`` with each open gate priced ``gate_overhead`` of the reference's cost higher (for the search)."""
    if not gate_overhead:
        return oc
    return dataclasses.replace(oc, gate_costs=oc.gate_costs + gate_overhead * oc.backbone_cost)


def try_each(
    candidates: list[tuple[Any, GateOutcomes]],
    goal: float,
    target_acc: float | None,
    max_drop: float | None,
    confidence: float | None,
    reserve: float,
    gate_overhead: float = 0.0,
    polish: bool = True,
) -> list[Tried]:
    """Search each ``(key, outcomes in MACs)`` candidate for ``goal`` (see :func:`choose`)."""
    tried = []
    for key, macs in candidates:
        searched = priced(macs, gate_overhead)
        path = lagrangian_path(searched)
        try:
            found = choose(searched, goal, target_acc, max_drop, confidence, reserve, polish, path)
            tried.append(Tried(key, macs, searched, path, found, in_macs(macs, found, searched), None))
        except TargetUnreachableError as exc:
            tried.append(Tried(key, macs, searched, path, None, None, exc))
    return tried


def cheapest(tried: list[Tried]) -> Tried:
    """The candidate with the lowest mean cost in MACs at the target (the first among equals);
    the first candidate's error if none reaches it."""
    reached = [t for t in tried if t.point is not None]
    if not reached:
        raise next(t.error for t in tried if t.error is not None)
    return min(reached, key=lambda t: t.point.mean_cost)  # type: ignore[union-attr]


def check_target(target_acc: float | None, max_drop: float | None) -> None:
    """Exactly one of an accuracy target and a drop, each in range; one-line errors otherwise."""
    if (target_acc is None) == (max_drop is None):
        raise SpecError("give exactly one of --target-acc (e.g. 0.93) and --max-drop (e.g. 0.01)")
    if target_acc is not None and not 0.0 < target_acc <= 1.0:
        raise SpecError(f"--target-acc must be a fraction in (0, 1], got {target_acc}; for 93% write 0.93")
    if max_drop is not None and not 0.0 <= max_drop < 1.0:
        raise SpecError(f"--max-drop must be a fraction in [0, 1), got {max_drop}; for one point write 0.01")


def choose(
    oc: GateOutcomes,
    goal: float,
    target_acc: float | None,
    max_drop: float | None,
    confidence: float | None,
    reserve: float,
    polish: bool = True,
    path: list[torch.Tensor] | None = None,
) -> OperatingPoint:
    """The operating point for ``goal``: with a ``confidence`` guarantee, a noise ``reserve``, or
    on the calibration outcomes exactly (``reserve`` 0)."""
    if confidence is not None:
        return search_confident(oc, confidence, target_acc=target_acc, max_drop=max_drop)
    if reserve > 0:
        return search_reserved(oc, goal, reserve, _path=path)
    return search(oc, goal, polish=polish, _path=path)
