"""The cost model: what a sample costs when it leaves at each exit. One object for calibration,
evaluation, the runtime and bench.

A sample that leaves at gate ``g`` pays the backbone up to ``g`` (``reach[g]``) plus every open gate
it passed, its own included; one that reaches the end pays the whole backbone (``reach[-1]``) plus
every open gate. Closed gates cost nothing: the runtime skips them.

Example:
    >>> cm = CostModel(reach=(2.0, 5.0, 10.0), gates=(0.5, 0.25))
    >>> cm.exit_costs().tolist(), cm.exit_costs([False, True]).tolist()
    ([2.5, 5.75, 10.75], [2.0, 5.25, 10.25])
    >>> cm.with_overhead(0.1).gates
    (1.5, 1.25)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SpecError


@dataclass(frozen=True)
class CostModel:
    """Per-sample costs of a gated model.

    Attributes:
        reach: ``G + 1`` costs from the input to each gate's position, then to the end.
        gates: ``G`` costs of evaluating each gate.
        unit: what the numbers count (``MACs``).
        reference: the cost cost ratios are taken against (default: the whole backbone,
            ``reach[-1]``; a cascade's is its last member's alone).
    """

    reach: tuple[float, ...]
    gates: tuple[float, ...]
    unit: str = "MACs"
    reference: float | None = None
    _reach: torch.Tensor = field(init=False, repr=False, compare=False)
    _gates: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reach", tuple(float(v) for v in self.reach))
        object.__setattr__(self, "gates", tuple(float(v) for v in self.gates))
        if len(self.reach) != len(self.gates) + 1:
            raise SpecError(
                f"a cost model needs one more reach cost than gates, got {len(self.reach)} and {len(self.gates)}"
            )
        object.__setattr__(self, "_reach", torch.tensor(self.reach, dtype=torch.float64))
        object.__setattr__(self, "_gates", torch.tensor(self.gates, dtype=torch.float64))

    @property
    def backbone(self) -> float:
        """The reference's cost (the plain backbone, no gates): the denominator of cost ratios."""
        return self.reach[-1] if self.reference is None else self.reference

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    def exit_costs(self, open_gates: Sequence[bool] | torch.Tensor | None = None) -> torch.Tensor:
        """``(G + 1,)`` float64 cost of leaving at each exit when ``open_gates`` are open (default: all)."""
        gc = self._gates if open_gates is None else self._gates * torch.as_tensor(open_gates, dtype=torch.float64)
        return self._reach + torch.cat([gc.cumsum(0), gc.sum().reshape(1)])

    def open_for(self, thresholds: Sequence[float]) -> list[bool]:
        """Which gates ``thresholds`` open (``inf`` closes one)."""
        return [t != float("inf") for t in thresholds]

    def mean_cost(self, exits: torch.Tensor, thresholds: Sequence[float]) -> float:
        """Mean cost of samples leaving at ``exits`` (exit indices) under ``thresholds``."""
        return float(self.exit_costs(self.open_for(thresholds))[exits].mean())

    def with_overhead(self, fraction: float) -> CostModel:
        """Each gate priced ``fraction`` of the backbone's cost higher: the fixed time a gate takes
        beyond its MACs (``calibrate --gate-overhead``)."""
        return CostModel(self.reach, tuple(g + fraction * self.backbone for g in self.gates), self.unit, self.reference)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"unit": self.unit, "reach": list(self.reach), "gates": list(self.gates)}
        if self.reference is not None:
            d["reference"] = self.reference
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(tuple(d["reach"]), tuple(d["gates"]), str(d.get("unit", "MACs")), d.get("reference"))
