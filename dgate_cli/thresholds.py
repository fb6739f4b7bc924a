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
runtime skips closed ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError, TargetUnreachableError

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

    The search charges every gate; :meth:`evaluate` charges only open gates (``t < inf``), as the
    runtime skips closed ones, so reported costs are exact and never above the searched ones.
    """

    scores: torch.Tensor
    correct: torch.Tensor
    final_correct: torch.Tensor
    reach_costs: torch.Tensor
    gate_costs: torch.Tensor

    def __post_init__(self) -> None:
        if self.scores.is_floating_point() and self.scores.dtype != torch.float32:
            # the runtime's scores are float32: compare as it does (see the module docstring)
            object.__setattr__(self, "scores", self.scores.float())
        if self.scores.dim() != 2:
            raise SpecError(f"gate outcomes need scores of shape (N, G), got {tuple(self.scores.shape)}")
        n, g = self.scores.shape
        if (
            self.correct.shape != (n, g)
            or self.final_correct.shape != (n,)
            or self.reach_costs.shape != (g + 1,)
            or self.gate_costs.shape != (g,)
        ):
            raise SpecError(
                f"inconsistent gate outcomes: scores {tuple(self.scores.shape)}, correct {tuple(self.correct.shape)}, "
                f"final {tuple(self.final_correct.shape)}, reach costs {tuple(self.reach_costs.shape)}, "
                f"gate costs {tuple(self.gate_costs.shape)}"
            )

    @property
    def backbone_cost(self) -> float:
        """The plain backbone's cost (no gates): the denominator of cost ratios."""
        return float(self.reach_costs[-1])

    def exit_costs(self, open_gates: torch.Tensor | None = None) -> torch.Tensor:
        """``(G + 1,)`` cost of leaving at each gate (its own and earlier open gates included)."""
        gc = self.gate_costs.double()
        if open_gates is not None:
            gc = gc * open_gates.double()
        spent = torch.cat([gc.cumsum(0), gc.sum().reshape(1)])
        return self.reach_costs.double() + spent

    @property
    def num_samples(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_gates(self) -> int:
        return int(self.scores.shape[1])

    @property
    def backbone_accuracy(self) -> float:
        return float(self.final_correct.double().mean())

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
            thresholds=tuple(float(v) for v in torch.as_tensor(thresholds, dtype=torch.float64)),
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


def _need(target: float, n: int) -> int:
    return int(math.ceil(target * n - 1e-9))


class _Searcher:
    """Threshold search: exact one-gate steps, Lagrangian continuation, exact two-gate moves.

    Costs charge only open gates (``t < inf``), exactly as :meth:`GateOutcomes.evaluate` does.
    """

    def __init__(self, oc: GateOutcomes):
        self.oc = oc
        self.scores = oc.scores.double()
        self.reach = oc.reach_costs.double()
        self.gate_costs = oc.gate_costs.double()
        self.correct_all = oc.all_correct()
        self.correct_f = self.correct_all.double()
        self.G = oc.num_gates
        self.N = oc.num_samples
        # each gate's samples sorted by score once; a sweep filters this order instead of sorting
        self.order = [torch.argsort(self.scores[:, g], descending=True, stable=True) for g in range(self.G)]

    # -- evaluation -------------------------------------------------------------------------------
    def costs_for(self, t: torch.Tensor) -> torch.Tensor:
        """``(G + 1,)`` exit costs when the gates with ``t < inf`` are open."""
        gc = torch.where(t < INF, self.gate_costs, torch.zeros_like(self.gate_costs))
        return self.reach + torch.cat([gc.cumsum(0), gc.sum().reshape(1)])

    def _exits(self, t: torch.Tensor) -> torch.Tensor:
        if self.G == 0:
            return torch.zeros(self.N, dtype=torch.long)
        ge = self.scores >= t
        return torch.where(ge.any(1), ge.to(torch.int8).argmax(1), self.G)

    def totals(self, t: torch.Tensor) -> tuple[int, float]:
        e = self._exits(t)
        return int(self.correct_all.gather(1, e[:, None]).sum()), float(self.costs_for(t)[e].sum())

    def key(self, t: torch.Tensor, need: int) -> tuple[int, float]:
        """(correct samples short of the target, total cost): smaller is better, in that order."""
        corr, cost = self.totals(t)
        return (max(0, need - corr), cost)

    @staticmethod
    def better(a: tuple[int, float], b: tuple[int, float]) -> bool:
        return a[0] < b[0] or (a[0] == b[0] and a[1] < b[1] - 1e-9 * abs(b[1]))

    @staticmethod
    def threshold(s: torch.Tensor, j: int) -> float:
        """The float32 threshold that lets exactly the ``j`` highest of the sorted float32 scores ``s`` exit.

        ``s[j] < t <= s[j - 1]`` holds in float32, where the runtime compares: the float32 nearest
        the midpoint, or the next float32 above ``s[j]`` when rounding lands on it.
        """
        if j == 0:
            return INF
        if j == s.numel():
            return -INF
        return between(float(s[j]), float(s[j - 1]))

    @staticmethod
    def _valid(s: torch.Tensor) -> torch.Tensor:
        """Cut positions ``0..len(s)`` that do not split equal scores (``s`` sorted high to low)."""
        valid = torch.ones(s.numel() + 1, dtype=torch.bool)
        if s.numel() > 1:
            valid[1:-1] = s[:-1] > s[1:]
        return valid

    # -- one gate at a time -----------------------------------------------------------------------
    def sweep(self, t: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every choice for gate ``g`` with the others fixed.

        Returns the scores of the samples reaching ``g`` sorted high to low, and for ``j = 0..R``
        (the ``j`` highest exit at ``g``; ``j = 0`` closes the gate) the total cost, the number
        correct, and whether ``j`` is a valid cut (it does not split equal scores).
        """
        closed = t.clone()
        closed[g] = INF
        opened = t.clone()
        opened[g] = -INF
        c_closed, c_open = self.costs_for(closed), self.costs_for(opened)
        e_after = self._exits(closed)
        reach = e_after > g
        corr_after = self.correct_f.gather(1, e_after[:, None]).squeeze(1)
        order = self.order[g][reach[self.order[g]]]
        s = self.scores[order, g]
        ca = c_open[e_after][order]
        ra = corr_after[order]
        rx = self.correct_f[order, g]
        zero = torch.zeros(1, dtype=torch.float64)
        j = torch.arange(s.numel() + 1, dtype=torch.float64)
        base_cost = float(c_open[e_after][~reach].sum())
        base_corr = float(corr_after[~reach].sum())
        cost = base_cost + j * float(c_open[g]) + (ca.sum() - torch.cat([zero, ca.cumsum(0)]))
        cost[0] = float(c_closed[e_after].sum())
        corr = (base_corr + torch.cat([zero, rx.cumsum(0)]) + (ra.sum() - torch.cat([zero, ra.cumsum(0)]))).round()
        return s, cost, corr, self._valid(s)

    def step(self, t: torch.Tensor, g: int, need: int) -> torch.Tensor:
        """The best threshold for gate ``g`` with the others fixed (feasibility first, then cost)."""
        s, cost, corr, valid = self.sweep(t, g)
        short = torch.where(valid, (need - corr).clamp_min(0), torch.full_like(corr, INF))
        cand = valid & (short == short.min())
        cost_c = torch.where(cand, cost, torch.full_like(cost, INF))
        new = t.clone()
        new[g] = self.threshold(s, int(torch.argmin(cost_c)))
        return new

    def descend(self, t: torch.Tensor, need: int, max_sweeps: int = 50) -> torch.Tensor:
        """Coordinate descent on (shortfall, cost) with exact steps, until no gate improves."""
        best = self.key(t, need)
        for _ in range(max_sweeps):
            improved = False
            for g in range(self.G):
                cand = self.step(t, g, need)
                k = self.key(cand, need)
                if self.better(k, best):
                    t, best, improved = cand, k, True
            if not improved:
                break
        return t

    # -- two gates at a time, exactly ---------------------------------------------------------------
    def pair(self, t: torch.Tensor, g: int, h: int, need: int, chunk: int = 1 << 22) -> torch.Tensor:
        """The best thresholds for gates ``g < h`` jointly, the others fixed (exact).

        With ``j1`` samples leaving at ``g`` (the highest scores among those reaching it) and a cut
        ``p`` in the order of gate ``h``'s scores, cost and correctness are a row term plus a masked
        prefix sum over ``p``; all ``(j1, p)`` are scanned in row chunks.
        """
        base_t = t.clone()
        base_t[g] = INF
        base_t[h] = INF
        c_base = self.costs_for(base_t)
        e0 = self._exits(base_t)
        cor0 = self.correct_f.gather(1, e0[:, None]).squeeze(1)
        reach_g = e0 > g
        K_cost = float(c_base[e0].sum())
        K_corr = float(cor0.sum())
        og = self.order[g][reach_g[self.order[g]]]  # reaching g, by score at g
        sg = self.scores[og, g]
        n_g = og.numel()
        rank_g = torch.full((self.N,), -1, dtype=torch.long)
        rank_g[og] = torch.arange(n_g)
        # leaving at g instead of the default exit e0
        zero = torch.zeros(1, dtype=torch.float64)
        A_cost = K_cost + torch.cat([zero, (float(c_base[g]) - c_base[e0[og]]).cumsum(0)])
        A_corr = K_corr + torch.cat([zero, (self.correct_f[og, g] - cor0[og]).cumsum(0)])
        in_h = reach_g & (e0 > h)
        oh = self.order[h][in_h[self.order[h]]]  # reaching h when not leaving at g, by score at h
        sh = self.scores[oh, h]
        w_cost = float(c_base[h]) - c_base[e0[oh]]
        w_corr = self.correct_f[oh, h] - cor0[oh]
        rg_h = rank_g[oh]
        valid_p = self._valid(sh)
        valid_j = self._valid(sg)
        gc_g, gc_h = float(self.gate_costs[g]), float(self.gate_costs[h])
        best_key: tuple[float, float] | None = None
        best_jp = (0, 0)
        rows = max(1, chunk // (oh.numel() + 1))
        for r0 in range(0, n_g + 1, rows):
            j1 = torch.arange(r0, min(n_g + 1, r0 + rows))
            present = rg_h[None, :] >= j1[:, None]  # (rows, |H|)
            pz = torch.zeros(j1.numel(), 1, dtype=torch.float64)
            B_cost = torch.cat([pz, (present * w_cost).cumsum(1)], 1)
            B_corr = torch.cat([pz, (present * w_corr).cumsum(1)], 1)
            n_present = present.sum(1).double()
            cost = A_cost[j1][:, None] + B_cost + (j1 > 0).double()[:, None] * gc_g * n_g
            cost[:, 1:] += gc_h * n_present[:, None]
            corr = (A_corr[j1][:, None] + B_corr).round()
            ok = valid_j[j1][:, None] & valid_p[None, :]
            short = torch.where(ok, (need - corr).clamp_min(0), torch.full_like(corr, INF))
            smin = float(short.min())
            cost_c = torch.where(ok & (short == smin), cost, torch.full_like(cost, INF))
            flat = int(torch.argmin(cost_c))
            k = (smin, float(cost_c.view(-1)[flat]))
            if best_key is None or k[0] < best_key[0] or (k[0] == best_key[0] and k[1] < best_key[1]):
                best_key, best_jp = k, (int(j1[flat // cost_c.shape[1]]), flat % cost_c.shape[1])
        new = t.clone()
        new[g] = self.threshold(sg, best_jp[0])
        new[h] = self.threshold(sh, best_jp[1])
        return new

    def polish(self, t: torch.Tensor, need: int, max_sweeps: int = 4) -> torch.Tensor:
        """Block coordinate descent with exact two-gate moves (all pairs up to 5 gates, else neighbours)."""
        if self.G < 2:
            return t
        pairs = [(g, h) for g in range(self.G) for h in range(g + 1, self.G)]
        if self.G > 5:
            pairs = [(g, g + 1) for g in range(self.G - 1)]
        best = self.key(t, need)
        for _ in range(max_sweeps):
            improved = False
            for g, h in pairs:
                cand = self.descend(self.pair(t, g, h, need), need)
                k = self.key(cand, need)
                if self.better(k, best):
                    t, best, improved = cand, k, True
            if not improved:
                break
        return t

    # -- Lagrangian continuation ------------------------------------------------------------------
    def lagrangian_path(self, steps: int = 40) -> list[torch.Tensor]:
        """Minimisers of ``cost - lam * correct`` for ``lam`` from large to small (each warm-started).

        Trading accuracy for cost at one price across all gates spreads the accuracy budget over the
        gates where it buys the most, which one-gate-at-a-time search cannot do.
        """
        t = torch.full((self.G,), INF, dtype=torch.float64)
        if self.G == 0:
            return [t]
        scale = float(self.reach[-1])
        path = []
        for lam in torch.logspace(3, -2, steps, dtype=torch.float64).tolist():
            lam *= scale
            best = self._lagrangian(t, lam)
            for _ in range(30):
                improved = False
                for g in range(self.G):
                    s, cost, corr, valid = self.sweep(t, g)
                    J = torch.where(valid, cost - lam * corr, torch.full_like(cost, INF))
                    cand = t.clone()
                    cand[g] = self.threshold(s, int(torch.argmin(J)))
                    v = self._lagrangian(cand, lam)
                    if v < best - 1e-12 * abs(best):
                        t, best, improved = cand, v, True
                if not improved:
                    break
            path.append(t.clone())
        return path

    def _lagrangian(self, t: torch.Tensor, lam: float) -> float:
        corr, cost = self.totals(t)
        return cost - lam * corr

    def best_for(self, need: int, path: list[torch.Tensor], polish: bool = True) -> torch.Tensor:
        """Descend from the path points around the target (and from all gates closed); polish the best."""
        feasible = [i for i, t in enumerate(path) if self.totals(t)[0] >= need]
        i = max(feasible) if feasible else -1  # the cheapest feasible point: the path runs to cheaper ones
        starts = [torch.full((self.G,), INF, dtype=torch.float64), *path[max(0, i) : i + 3]]
        best = None
        for start in starts:
            cand = self.descend(start, need)
            if best is None or self.better(self.key(cand, need), self.key(best, need)):
                best = cand
        assert best is not None
        return self.polish(best, need) if polish else best


def search(
    oc: GateOutcomes, target: float, polish: bool = True, _path: list[torch.Tensor] | None = None
) -> OperatingPoint:
    """The cheapest thresholds with accuracy ``>= target`` on the calibration outcomes.

    Args:
        oc: per-sample outcomes at each gate on the calibration split.
        target: the accuracy to reach, in [0, 1].
        polish: finish with pairwise moves (slower, O(G^2); a little cheaper).

    Raises:
        TargetUnreachableError: if no thresholds reach ``target``.

    Example:
        >>> oc = GateOutcomes(torch.tensor([[2.0], [0.1], [1.5]]), torch.tensor([[True], [False], [True]]),
        ...                   torch.tensor([True, True, False]), torch.tensor([1.0, 9.0]), torch.tensor([0.5]))
        >>> p = search(oc, target=1.0)
        >>> round(p.thresholds[0], 4), p.accuracy, p.exit_fractions
        (0.8, 1.0, (0.6666666666666666, 0.3333333333333333))
    """
    if not 0.0 <= target <= 1.0:
        raise SpecError(f"target accuracy must be in [0, 1], got {target}")
    s = _Searcher(oc)
    need = _need(target, oc.num_samples)
    t = s.best_for(need, s.lagrangian_path() if _path is None else _path, polish=polish)
    point = oc.evaluate(t)
    if s.key(t, need)[0] > 0:
        best = max_accuracy(oc)
        raise TargetUnreachableError(
            f"no thresholds reach accuracy {target:.4f} on the calibration split (best reachable {best.accuracy:.4f}, "
            f"backbone {oc.backbone_accuracy:.4f}); lower --target-acc or use --max-drop",
            best_accuracy=best.accuracy,
            backbone_accuracy=oc.backbone_accuracy,
        )
    check_promise(oc, point, need)
    return _with_target(point, target)


def check_promise(oc: GateOutcomes, point: OperatingPoint, need: int) -> None:
    """Check with the runtime's arithmetic (float32 scores >= float32 thresholds) that ``point``'s
    thresholds get at least ``need`` samples right; raise if they do not (a search bug)."""
    e = oc.exits(point.thresholds)
    correct = int(oc.all_correct().gather(1, e[:, None]).sum())
    if correct < need:
        raise TargetUnreachableError(
            f"internal error: the thresholds found get {correct} of {oc.num_samples} calibration samples right "
            f"when compared in float32, {need} were promised; please report this",
            best_accuracy=correct / max(1, oc.num_samples),
            backbone_accuracy=oc.backbone_accuracy,
        )


def max_accuracy(oc: GateOutcomes, _path: list[torch.Tensor] | None = None) -> OperatingPoint:
    """The most accurate thresholds (cheapest among them)."""
    s = _Searcher(oc)
    path = s.lagrangian_path() if _path is None else _path
    return oc.evaluate(s.best_for(oc.num_samples, path[:1], polish=False))


def lagrangian_path(oc: GateOutcomes) -> list[torch.Tensor]:
    """The search's Lagrangian path: the slow, target-independent part of :func:`search`. Compute it
    once and pass it (``_path=``) to several searches on the same outcomes."""
    return _Searcher(oc).lagrangian_path()


def _with_target(p: OperatingPoint, target: float | None) -> OperatingPoint:
    return OperatingPoint(p.thresholds, p.accuracy, p.mean_cost, p.cost_ratio, p.exit_fractions, target)


def sequential(oc: GateOutcomes, target: float) -> OperatingPoint:
    """The paper's rule: thresholds set one gate after another, each as low as the target allows
    with the later gates closed (one sweep of coordinate descent from all gates closed)."""
    s = _Searcher(oc)
    need = _need(target, oc.num_samples)
    t = torch.full((oc.num_gates,), INF, dtype=torch.float64)
    for g in range(oc.num_gates):
        t = s.step(t, g, need)
    if s.key(t, need)[0] > 0:
        t = torch.full((oc.num_gates,), INF, dtype=torch.float64)
    return _with_target(oc.evaluate(t), target)


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


# -- targets that hold on new data with a given probability ------------------------------------------


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(0, k + 1, dtype=torch.float64)
    logc = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    logp = logc + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(torch.logsumexp(logp, 0).exp().clamp(max=1.0))


def binomial_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on p after ``k`` successes in ``n`` trials.

    Example:
        >>> round(binomial_upper(0, 100, 0.95), 4)  # the "rule of three": about 3/n
        0.0295
    """
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):  # P(X <= k | p) decreases in p: find where it equals 1 - confidence
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_lower(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound on p after ``k`` successes in ``n`` trials."""
    return 1.0 - binomial_upper(n - k, n, confidence) if n else 0.0


def drop_upper_bound(oc: GateOutcomes, thresholds: Sequence[float], confidence: float) -> float:
    """An upper bound, holding with probability ``confidence``, on the accuracy drop below the backbone.

    Only discordant samples move the drop: ``lost`` (backbone right, gated wrong) and ``gained``
    (the reverse). Given their number ``m``, ``lost`` is binomial, so the drop
    ``(lost - gained) / N = (2 p - 1) m / N`` is bounded with the Clopper-Pearson bound on ``p``.
    """
    lost, gained = discordant(oc, thresholds)
    m = lost + gained
    if m == 0:
        return 0.0
    return (2 * binomial_upper(lost, m, confidence) - 1) * m / oc.num_samples


def subset(oc: GateOutcomes, index: torch.Tensor) -> GateOutcomes:
    """The outcomes of the samples at ``index`` (same gates and costs)."""
    return GateOutcomes(oc.scores[index], oc.correct[index], oc.final_correct[index], oc.reach_costs, oc.gate_costs)


CONFIDENT_STEP = 0.0025  # spacing of the nominal accuracies of the candidates


def search_confident(
    oc: GateOutcomes,
    confidence: float,
    target_acc: float | None = None,
    max_drop: float | None = None,
    seed: int = 0,
) -> OperatingPoint:
    """The cheapest thresholds whose target holds on new data with probability ``confidence``.

    Learn, then test (Angelopoulos et al. 2021): a bound computed on the split the thresholds were
    searched on is optimistic, because the search picks where that split is lucky. So the split is
    halved at random. On the first half, :func:`search` proposes candidates, from the most accurate
    to the cheapest, and orders them by their bound on that half (the safest first). On the second
    half each candidate is tested in that order with a one-sided binomial bound at level
    ``1 - confidence`` (Clopper-Pearson on the accuracy for ``target_acc``; on the discordant
    samples, :func:`drop_upper_bound`, for ``max_drop``) until one fails; the cheapest candidate that
    passed is kept. The candidates and their order do not depend on the half that tests them, and
    fixed-sequence testing needs no multiplicity correction, so the target holds with probability
    at least ``confidence``. Costs and accuracy are then reported on the whole split.

    Raises:
        TargetUnreachableError: if even the backbone alone cannot be shown to meet the target.
    """
    if not 0.5 <= confidence < 1.0:
        raise SpecError(f"--confidence must be in [0.5, 1), got {confidence}; 0.95 is usual")
    if (target_acc is None) == (max_drop is None):
        raise SpecError("give target_acc or max_drop")
    n = oc.num_samples
    if n < 20:
        raise SpecError(f"--confidence needs a calibration split of at least 20 images, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    learn, test = subset(oc, perm[: n // 2]), subset(oc, perm[n // 2 :])

    def risk(half: GateOutcomes, t: tuple[float, ...]) -> float:
        """How far the bound on ``half`` falls short of the target (<= 0: the target holds)."""
        if target_acc is not None:
            correct = round(half.evaluate(t).accuracy * half.num_samples)
            return target_acc - binomial_lower(correct, half.num_samples, confidence)
        return drop_upper_bound(half, t, confidence) - max_drop  # type: ignore[operator]

    def holds(t: tuple[float, ...]) -> bool:
        return risk(test, t) <= 1e-12

    closed = tuple([INF] * oc.num_gates)
    goal = target_acc if target_acc is not None else oc.backbone_accuracy - max_drop  # type: ignore[operator]
    if not holds(closed):
        best = max_accuracy(oc)
        raise TargetUnreachableError(
            f"accuracy {goal:.4f} cannot be guaranteed with confidence {confidence} on {n} calibration samples "
            f"even by the backbone alone (backbone {oc.backbone_accuracy:.4f}); lower the target or the confidence, "
            "or calibrate on more images",
            best_accuracy=best.accuracy,
            backbone_accuracy=oc.backbone_accuracy,
        )
    path = _Searcher(learn).lagrangian_path()
    learn_goal = goal if target_acc is not None else learn.backbone_accuracy - max_drop  # type: ignore[operator]
    candidates: dict[tuple[float, ...], tuple[float, float]] = {}
    top, bottom = min(1.0, max(learn_goal, learn.backbone_accuracy) + 0.02), max(0.0, learn_goal - 0.02)
    for j in range(int(round((top - bottom) / CONFIDENT_STEP)) + 1):  # from 2 points above both to 2 below the goal
        try:
            t = search(learn, top - j * CONFIDENT_STEP, polish=False, _path=path).thresholds
        except TargetUnreachableError:
            continue
        if t not in candidates:
            candidates[t] = (risk(learn, t), -learn.evaluate(t).mean_cost)
    chosen, chosen_cost = closed, oc.evaluate(closed).mean_cost
    for t in sorted(candidates, key=candidates.__getitem__):  # the safest on the first half first
        if not holds(t):
            break
        cost = oc.evaluate(t).mean_cost
        if cost < chosen_cost:
            chosen, chosen_cost = t, cost
    return _with_target(oc.evaluate(chosen), goal)


def _bisect_nominal(
    oc: GateOutcomes,
    goal: float,
    ok: Callable[[tuple[float, ...]], bool],
    path: list[torch.Tensor] | None = None,
    guess: Callable[[tuple[float, ...]], float] | None = None,
    known: dict[int, tuple[float, ...] | None] | None = None,
) -> tuple[float, ...]:
    """The cheapest :func:`search` result, over nominal targets from ``goal`` up, that ``ok`` accepts.

    Cost falls as the nominal target falls, so this looks for the lowest nominal count of correct
    samples whose thresholds ``ok`` still accepts (all gates closed, the backbone alone, is the
    fallback). ``guess(thresholds)`` proposes a nominal accuracy from a rejected point (e.g. the
    goal plus that point's reserve); a few such steps bracket the answer tightly, then integer
    bisection finishes it. Each count is searched at most once (``known``: counts already searched).
    """
    n = oc.num_samples
    path = _Searcher(oc).lagrangian_path() if path is None else path
    memo: dict[int, tuple[float, ...] | None] = dict(known or {})

    def at(need: int) -> tuple[float, ...] | None:
        if need not in memo:
            try:
                memo[need] = search(oc, need / n, polish=False, _path=path).thresholds
            except TargetUnreachableError:
                memo[need] = None
        return memo[need]

    def good(need: int) -> bool:
        t = at(need)
        return t is not None and ok(t)

    lo = _need(goal, n) - 1  # the largest count known to be rejected (or below the goal)
    reachable = round(max_accuracy(oc, _path=path).accuracy * n)
    hi = min(reachable, _need(min(1.0, goal + 0.05), n))  # the bracket's top
    if hi <= lo:
        return tuple([INF] * oc.num_gates)
    if not good(hi):
        return tuple([INF] * oc.num_gates)  # the bracket's top is not enough: keep the backbone
    if guess is not None:
        probe = lo + 1
        for _ in range(4):  # guided steps: bracket the answer from below
            if probe >= hi or good(probe):
                hi = min(hi, probe)
                break
            lo = probe
            t = at(probe)
            probe = max(probe + 1, _need(guess(t), n)) if t is not None else hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if good(mid):
            hi = mid
        else:
            lo = mid
    return at(hi)  # type: ignore[return-value]


def discordant(oc: GateOutcomes, thresholds: Sequence[float]) -> tuple[int, int]:
    """``(lost, gained)``: samples the backbone gets right and the gated network wrong, and the reverse."""
    e = oc.exits(thresholds)
    gated = oc.all_correct().gather(1, e[:, None]).squeeze(1)
    return int((oc.final_correct & ~gated).sum()), int((~oc.final_correct & gated).sum())


def reserve(oc: GateOutcomes, thresholds: Sequence[float], z: float) -> float:
    """``z`` standard deviations of the accuracy estimate's discordant part: ``z sqrt(lost + gained) / N``.

    Only discordant samples make the gated accuracy differ from the backbone's, and the search picks
    thresholds where they happen to fall well; keeping this much in reserve makes the target hold
    on new data in expectation (measured in benchmarks/RESULTS.md).
    """
    lost, gained = discordant(oc, thresholds)
    return z * math.sqrt(lost + gained) / oc.num_samples


def search_reserved(
    oc: GateOutcomes, target: float, z: float, _path: list[torch.Tensor] | None = None
) -> OperatingPoint:
    """The cheapest thresholds with ``accuracy - reserve(z) >= target`` on the calibration outcomes.

    ``z = 0`` is :func:`search` (the calibration split's accuracy alone: the paper's rule).

    Raises:
        TargetUnreachableError: if no thresholds reach ``target``.
    """
    if z < 0:
        raise SpecError(f"the noise reserve z must be >= 0, got {z}")
    if z == 0:
        return search(oc, target, _path=_path)
    path = lagrangian_path(oc) if _path is None else _path
    first = search(oc, target, polish=False, _path=path)  # raises TargetUnreachableError with the reachable accuracy
    t = _bisect_nominal(
        oc,
        target,
        lambda t: oc.evaluate(t).accuracy - reserve(oc, t, z) >= target - 1e-12,
        path=path,
        guess=lambda t: target + reserve(oc, t, z),
        known={_need(target, oc.num_samples): first.thresholds},
    )
    return _with_target(oc.evaluate(t), target)
