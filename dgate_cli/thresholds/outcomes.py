"""Calibration outcomes and operating points: what every sample does at every gate, and what a
choice of thresholds gives.

A sample exits at the first gate ``g`` whose score reaches the threshold (``score >= t_g``),
predicting that gate's class; a sample no gate takes pays the whole backbone. Thresholds are
float32 numbers compared with float32 scores, as the runtime compares them (:func:`between`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..errors import SpecError
from .cost import CostModel

INF = math.inf


@dataclass(frozen=True)
class GateOutcomes:
    """What every calibration sample would do at every gate.

    Attributes:
        scores: ``(N, G)`` gate confidence per sample.
        correct: ``(N, G)`` whether the gate's prediction is right.
        final_correct: ``(N,)`` whether the backbone's prediction is right.
        reach_costs: ``(G + 1,)`` backbone cost from the input to gate ``g``; the last entry is the
            whole backbone.
        gate_costs: ``(G,)`` cost of evaluating each gate.
        reference_correct: ``(N,)`` whether the reference model is right, where it is not the
            last exit's model (a cascade: the last member alone, while the cascade's last exit may
            average the members' answers). Accuracy drops and their noise are measured against it.
        reference_cost: the reference's cost, the denominator of cost ratios (default: the
            whole backbone, ``reach_costs[-1]``).

    Costs charge only open gates (``t < inf``), as the runtime skips closed ones.
    """

    scores: torch.Tensor
    correct: torch.Tensor
    final_correct: torch.Tensor
    reach_costs: torch.Tensor
    gate_costs: torch.Tensor
    reference_correct: torch.Tensor | None = None
    reference_cost: float | None = None

    def __post_init__(self) -> None:
        if self.scores.is_floating_point() and self.scores.dtype != torch.float32:
            # the runtime's scores are float32: compare as it does (see :mod:`.search`)
            object.__setattr__(self, "scores", self.scores.float())
        if self.scores.dim() != 2:
            raise SpecError(f"gate outcomes need scores of shape (N, G), got {tuple(self.scores.shape)}")
        n, g = self.scores.shape
        if (
            self.correct.shape != (n, g)
            or self.final_correct.shape != (n,)
            or self.reach_costs.shape != (g + 1,)
            or self.gate_costs.shape != (g,)
            or (self.reference_correct is not None and self.reference_correct.shape != (n,))
        ):
            raise SpecError(
                f"inconsistent gate outcomes: scores {tuple(self.scores.shape)}, correct {tuple(self.correct.shape)}, "
                f"final {tuple(self.final_correct.shape)}, reach costs {tuple(self.reach_costs.shape)}, "
                f"gate costs {tuple(self.gate_costs.shape)}"
            )

    @cached_property
    def cost(self) -> CostModel:
        """The cost model of these outcomes (built once from ``reach_costs`` and ``gate_costs``)."""
        return CostModel(
            tuple(self.reach_costs.tolist()), tuple(self.gate_costs.tolist()), reference=self.reference_cost
        )

    @property
    def backbone_cost(self) -> float:
        """The reference's cost (the plain backbone, no gates): the denominator of cost ratios."""
        return self.cost.backbone

    @property
    def reference(self) -> torch.Tensor:
        """``(N,)`` whether the reference model (the plain backbone) is right."""
        return self.final_correct if self.reference_correct is None else self.reference_correct

    def exit_costs(self, open_gates: torch.Tensor | None = None) -> torch.Tensor:
        """``(G + 1,)`` cost of leaving at each gate (its own and earlier open gates included)."""
        return self.cost.exit_costs(open_gates)

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_gates(self) -> int:
        return int(self.scores.shape[1])

    @property
    def backbone_accuracy(self) -> float:
        """The reference's accuracy (the plain backbone's)."""
        return float(self.reference.double().mean())

    def all_correct(self) -> torch.Tensor:
        """``(N, G + 1)`` correctness at each exit, the backbone last."""
        return torch.cat([self.correct, self.final_correct[:, None]], 1)

    def exits(self, thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Exit index per sample (``G`` = the backbone) under ``thresholds``."""
        t = torch.as_tensor(thresholds, dtype=self.scores.dtype)
        if t.shape != (self.num_gates,):
            raise SpecError(f"expected {self.num_gates} thresholds (one per gate), got {tuple(t.shape)}")
        if self.num_gates == 0:
            return torch.zeros(self.num_samples, dtype=torch.long)
        ge = self.scores >= t
        return torch.where(ge.any(1), ge.to(torch.int8).argmax(1), self.num_gates)

    def evaluate(self, thresholds: Sequence[float] | torch.Tensor) -> OperatingPoint:
        """Accuracy, mean cost and exit fractions under ``thresholds``."""
        t = torch.as_tensor(thresholds, dtype=torch.float64)
        e = self.exits(thresholds)
        correct = self.all_correct().gather(1, e[:, None]).squeeze(1)
        counts = torch.bincount(e, minlength=self.num_gates + 1)
        mean_cost = float(self.exit_costs(t < INF)[e].mean())
        return OperatingPoint(
            thresholds=tuple(float(v) for v in t),
            accuracy=float(correct.double().mean()),
            mean_cost=mean_cost,
            cost_ratio=mean_cost / self.backbone_cost,
            exit_fractions=tuple(float(c) / self.num_samples for c in counts),
        )


@dataclass(frozen=True)
class OperatingPoint:
    """One choice of thresholds and what it gives on the calibration split.

    ``thresholds[g] = inf`` closes gate ``g``; ``-inf`` lets every sample that reaches it leave.
    """

    thresholds: tuple[float, ...]
    accuracy: float
    mean_cost: float
    cost_ratio: float
    exit_fractions: tuple[float, ...]
    target: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": [encode_threshold(t) for t in self.thresholds],
            "accuracy": self.accuracy,
            "mean_cost": self.mean_cost,
            "cost_ratio": self.cost_ratio,
            "exit_fractions": list(self.exit_fractions),
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        return cls(
            thresholds=tuple(decode_threshold(t) for t in d["thresholds"]),
            accuracy=float(d["accuracy"]),
            mean_cost=float(d["mean_cost"]),
            cost_ratio=float(d["cost_ratio"]),
            exit_fractions=tuple(float(v) for v in d["exit_fractions"]),
            target=d.get("target"),
        )


def encode_threshold(t: float) -> float | str:
    """JSON has no infinities: closed gates are written ``"inf"``."""
    return "inf" if t == INF else "-inf" if t == -INF else float(t)


def decode_threshold(t: float | str | None) -> float:
    if t is None or t == "inf":
        return INF
    if t == "-inf":
        return -INF
    return float(t)


_F32_MAX = float(torch.finfo(torch.float32).max)


def f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (beyond float32's range: an infinity)."""
    return float(torch.tensor(v, dtype=torch.float64).float())


def between(lo: float, hi: float) -> float:
    """A float32 threshold ``t`` with ``lo < t <= hi`` in float32 (``lo < hi`` float32 values).

    Example:
        >>> one_ulp_up = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
        >>> t = between(1.0, one_ulp_up)
        >>> 1.0 < t <= one_ulp_up  # the float64 midpoint would round back onto 1.0
        True
    """
    t = f32((lo + hi) / 2) if math.isfinite(lo) and math.isfinite(hi) else (hi if math.isfinite(hi) else lo)
    if not t > lo:
        t = float(torch.nextafter(torch.tensor(lo, dtype=torch.float32), torch.tensor(math.inf)))
    if t > hi:
        t = hi
    return min(t, _F32_MAX)  # inf would close the gate


def subset(oc: GateOutcomes, index: torch.Tensor) -> GateOutcomes:
    """The outcomes of the samples at ``index`` (same gates and costs)."""
    ref = None if oc.reference_correct is None else oc.reference_correct[index]
    return GateOutcomes(
        oc.scores[index],
        oc.correct[index],
        oc.final_correct[index],
        oc.reach_costs,
        oc.gate_costs,
        ref,
        oc.reference_cost,
    )


def discordant(oc: GateOutcomes, thresholds: Sequence[float]) -> tuple[int, int]:
    """``(lost, gained)``: samples the reference (the backbone) gets right and the gated network wrong, and the reverse."""
    e = oc.exits(thresholds)
    gated = oc.all_correct().gather(1, e[:, None]).squeeze(1)
    ref = oc.reference
    return int((ref & ~gated).sum()), int((~ref & gated).sum())


def in_macs(macs: GateOutcomes, p: OperatingPoint, searched: GateOutcomes) -> OperatingPoint:
    """``p``, found on ``searched``, with its cost in MACs (the search priced gates higher under
    ``gate_overhead``)."""
    if searched is macs:
        return p
    q = macs.evaluate(p.thresholds)
    return OperatingPoint(q.thresholds, q.accuracy, q.mean_cost, q.cost_ratio, q.exit_fractions, p.target)
