"""Choosing gate thresholds: pure tensor maths, no IO.

A sample exits at the first gate ``g`` whose score reaches the threshold (``score >= t_g``),
predicting that gate's class; a sample no gate takes pays the whole backbone. Given, for a
calibration split, every sample's score and correctness at every gate, :func:`search` finds the
thresholds with the lowest mean cost subject to ``accuracy >= target``.

The search combines three exact moves. With the other thresholds fixed, the best threshold of one
gate is found by sorting the samples that reach it by score and scanning every cut with prefix sums
(O(N log N)); the best pair of thresholds for two gates is found by scanning every combination of
cuts with a masked prefix-sum matrix (O(N^2), in chunks). A Lagrangian continuation (minimise
``cost - lam * correct`` for decreasing ``lam``) spreads the accuracy budget across gates and gives
starting points; coordinate descent from them, then block descent over pairs of gates (all pairs up
to five gates, neighbouring pairs beyond), finishes. For two gates the result is the exact optimum;
for three it is at least as cheap as an exhaustive search over a fine grid (tested); the paper's
sequential rule is the first sweep from all gates closed, so the search never does worse.
Thresholds are float32 numbers, as the runtime compares float32 scores with float32 thresholds:
each sits between two consecutive distinct scores (at the float32 nearest their midpoint, moved
off the lower score where the two are a few ulps apart), and every accuracy the search promises is
checked with exactly that comparison before it is returned. Costs charge only open gates, as the
runtime skips closed ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TargetUnreachableError
from .guarantees import search_reserved
from .outcomes import GateOutcomes, OperatingPoint
from .search import _with_target, lagrangian_path, search


@dataclass(frozen=True)
class Frontier:
    """Operating points from the backbone's accuracy down, cheapest for each accuracy target."""

    points: list[OperatingPoint] = field(default_factory=list)

    def to_list(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.points]


DEFAULT_DROPS = (0.0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2)  # fractions of accuracy


def frontier(
    oc: GateOutcomes,
    drops: Sequence[float] = DEFAULT_DROPS,
    polish: bool = False,
    z: float = 0.0,
    _path: list[torch.Tensor] | None = None,
) -> Frontier:
    """Cheapest thresholds at each accuracy drop below the backbone's (non-dominated points only).

    With ``z > 0`` each point keeps the noise reserve of :func:`search_reserved`; a point's ``target``
    is the accuracy it promises on new data, its ``accuracy`` what it reaches on the calibration split.
    """
    points = []
    path = lagrangian_path(oc) if _path is None else _path
    for d in drops:
        target = max(0.0, oc.backbone_accuracy - d)
        try:
            if z > 0:
                points.append(search_reserved(oc, target, z, _path=path))
            else:
                points.append(_with_target(search(oc, target, polish=polish, _path=path), target))
        except TargetUnreachableError:
            continue
    points.sort(key=lambda p: (-(p.target or 0.0), p.mean_cost))
    kept: list[OperatingPoint] = []
    for p in points:  # drop points that cost more than one promising more
        if not kept or p.mean_cost < kept[-1].mean_cost - 1e-9:
            kept.append(p)
    return Frontier(kept)
