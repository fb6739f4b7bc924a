"""Choosing a :class:`GatedModel`'s thresholds: checking a list of them (rounded to float32, in
which the runtime compares), and picking a stored frontier point by accuracy drop or index."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import SpecError
from ..thresholds.cost import CostModel
from ..thresholds.outcomes import OperatingPoint, decode_threshold, f32


def parse_thresholds(values: Sequence[float | str | None], num_gates: int) -> list[float]:
    """One float32 threshold per gate from ``values`` (``inf``, ``"inf"`` or None: closed).

    Raises:
        SpecError (a ValueError): not a list of ``num_gates`` numbers, ``inf`` or None, or a NaN.
    """
    try:
        values = [] if isinstance(values, (str, bytes)) else list(values)
    except TypeError:
        values = []
    if not values and num_gates:
        raise SpecError(f"thresholds must be a list of {num_gates} numbers (one per gate)")
    if len(values) != num_gates:
        raise SpecError(f"expected {num_gates} thresholds (one per gate), got {len(values)}")
    try:
        parsed = [decode_threshold(t) for t in values]
    except (TypeError, ValueError):
        raise SpecError(f"thresholds must be numbers, 'inf' or None, got {values!r}") from None
    if any(math.isnan(v) for v in parsed):
        raise SpecError("thresholds must be numbers or inf, not NaN")
    # float32, as compared; a finite threshold beyond float32's range stays open (and unreachable)
    return [t if math.isinf(t) else _finite_f32(t) for t in parsed]


def select(model: Any, max_drop: float | None = None, thresholds: Sequence[float | str | None] | None = None) -> None:
    """Put ``model`` (a :class:`GatedModel`) at the stored frontier point within ``max_drop``, or at
    ``thresholds``; neither given: leave it as it is. What ``evaluate`` and ``bench`` do with
    ``--max-drop`` / ``--thresholds``."""
    if max_drop is not None and thresholds is not None:
        raise SpecError("give --max-drop or --thresholds, not both")
    if max_drop is not None:
        model.use_operating_point(max_drop=max_drop)
    if thresholds is not None:
        model.set_thresholds(list(thresholds))


def pick_point(
    frontier: Sequence[OperatingPoint],
    calibration: Mapping[str, Any],
    cost: CostModel | None,
    max_drop: float | None = None,
    index: int | None = None,
) -> OperatingPoint:
    """The frontier point at ``index``, or the cheapest (:func:`search_cost`) whose promised accuracy
    (its calibration target) is within ``max_drop`` of the backbone's in ``calibration`` (the
    manifest's calibration report)."""
    if not frontier:
        raise ValueError("this model has no stored frontier; set thresholds with set_thresholds()")
    if (max_drop is None) == (index is None):
        raise ValueError("give exactly one of max_drop and index")
    if index is not None:
        return frontier[index]
    base = calibration.get("backbone_accuracy")
    promise = [p.target if p.target is not None else p.accuracy for p in frontier]
    top = base if base is not None else max(promise)
    ok = [p for p, a in zip(frontier, promise, strict=True) if a >= top - max_drop - 1e-12]  # type: ignore[operator]
    if not ok:
        ok = [frontier[max(range(len(promise)), key=promise.__getitem__)]]
    return min(ok, key=lambda p: search_cost(p, cost, calibration))


def search_cost(p: OperatingPoint, cost: CostModel | None, calibration: Mapping[str, Any]) -> float:
    """What calibration minimised for ``p``: its mean cost under the cost model it searched with
    (``--gate-overhead`` prices gates higher), so that switching points does not reopen gates
    the calibration closed as not worth their time."""
    overhead = float(calibration.get("target", {}).get("gate_overhead") or 0.0)
    if not overhead or cost is None:
        return p.mean_cost
    costs = cost.with_overhead(overhead).exit_costs(cost.open_for(p.thresholds))
    return float((costs * torch.tensor(p.exit_fractions, dtype=torch.float64)).sum())


def _finite_f32(v: float) -> float:
    r = f32(v)
    return math.copysign(float(torch.finfo(torch.float32).max), v) if math.isinf(r) else r
