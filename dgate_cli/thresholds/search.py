"""The threshold search: the cheapest gate thresholds that reach an accuracy target.

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

import math

import torch

from ..errors import SpecError, TargetUnreachableError
from .outcomes import INF, GateOutcomes, OperatingPoint, between


def _need(target: float, n: int) -> int:
    return int(math.ceil(target * n - 1e-9))


class _Searcher:
    """Threshold search: exact one-gate steps, Lagrangian continuation, exact two-gate moves.

    Costs charge only open gates (``t < inf``), exactly as :meth:`GateOutcomes.evaluate` does.
    """

    def __init__(self, oc: GateOutcomes):
        self.oc = oc
        self.scores = oc.scores.double()
        self.cost = oc.cost
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
        return self.cost.exit_costs(t < INF)

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
        return self._sweep(t, need, [lambda t, g=g: self.step(t, g, need) for g in range(self.G)], max_sweeps)

    def _sweep(self, t: torch.Tensor, need: int, moves: list, max_sweeps: int) -> torch.Tensor:
        """Apply each move in turn, keeping what improves (shortfall, cost), until a sweep improves nothing."""
        best = self.key(t, need)
        for _ in range(max_sweeps):
            improved = False
            for move in moves:
                cand = move(t)
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
        moves = [lambda t, g=g, h=h: self.descend(self.pair(t, g, h, need), need) for g, h in pairs]
        return self._sweep(t, need, moves, max_sweeps)

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
