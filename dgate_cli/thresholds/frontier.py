"""The accuracy-cost frontier: the cheapest operating point at each accuracy drop below the backbone's
(the search itself is in :mod:`.search`)."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.to_list()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Frontier:
        return cls([OperatingPoint.from_dict(p) for p in d["points"]])


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
