"""Threshold search: never costlier than an exhaustive search over a fine grid of thresholds (a
reference implemented here), never costlier than the paper's sequential rule, always feasible;
exit semantics and costs on a hand-made example; the frontier; (de)serialisation; validation."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CIFAR, R20, needs_shared

from dgate_cli.errors import SpecError, TargetUnreachableError
from dgate_cli.thresholds.frontier import frontier
from dgate_cli.thresholds.guarantees import search_confident, search_reserved
from dgate_cli.thresholds.outcomes import (
    GateOutcomes,
    OperatingPoint,
    between,
    decode_threshold,
    encode_threshold,
    subset,
)
from dgate_cli.thresholds.search import max_accuracy, search, sequential

INF = math.inf
DROPS = (0.0, 0.005, 0.01, 0.02, 0.05)


TORCH_THREADS = 1  # tiny models and many small tensor ops (see conftest._threads)


# -- synthetic outcomes -----------------------------------------------------------------------------
def synthetic(G: int, N: int = 2000, seed: int = 0, quantize: float | None = None) -> GateOutcomes:
    """Outcomes with the structure of real ones: a per-sample difficulty shared by all exits, deeper
    exits more often right, scores that are higher for easy samples and for right answers, backbone
    costs increasing with depth, small gate costs. ``quantize`` rounds the scores (many ties)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    difficulty = torch.randn(N, generator=g, dtype=f64)
    ease = -0.3 + 2.2 * torch.linspace(0, 1, G + 1, dtype=f64)  # the backbone is the last exit
    logit = ease[None, :] - 1.3 * difficulty[:, None] + 0.6 * torch.randn(N, G + 1, generator=g, dtype=f64)
    correct = torch.rand(N, G + 1, generator=g, dtype=f64) < torch.sigmoid(logit)
    noise = 0.7 * torch.randn(N, G, generator=g, dtype=f64)
    scores = (0.8 * logit[:, :G] + 0.8 * correct[:, :G].double() + noise).float()
    if quantize:
        scores = (scores / quantize).round() * quantize
    reach = torch.cumsum(torch.rand(G + 1, generator=g, dtype=f64) + 0.5, 0)
    reach = reach / reach[-1]
    gate_costs = 0.01 + 0.04 * torch.rand(G, generator=g, dtype=f64)
    return GateOutcomes(scores, correct[:, :G], correct[:, G], reach, gate_costs)


# (seed, quantize): seed 2 has heavily tied scores
SEEDS = {0: None, 1: None, 2: 0.05}


@functools.cache
def synthetic_case(G: int, seed: int) -> GateOutcomes:
    return synthetic(G, seed=seed, quantize=SEEDS[seed])


# -- the reference: exhaustive search over a grid of thresholds --------------------------------------
LEVELS = {1: None, 2: 200, 3: 40}  # midpoints per gate (None: every distinct-score midpoint)


def candidates(scores: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Ascending: -inf, ``levels`` evenly spread midpoints between neighbouring distinct scores, +inf."""
    u = torch.unique(scores.double())
    mids = (u[1:] + u[:-1]) / 2
    if levels is not None and mids.numel() > levels:
        mids = mids[torch.linspace(0, mids.numel() - 1, levels).round().long().unique()]
    return torch.cat([mids.new_tensor([-INF]), mids, mids.new_tensor([INF])])


@dataclass(frozen=True)
class Grid:
    """Every combination of the candidate thresholds, evaluated as :meth:`GateOutcomes.evaluate`
    does: correct counts and mean costs, each of shape ``(len(candidates[0]), ..., len(candidates[-1]))``."""

    candidates: list[torch.Tensor]
    correct: torch.Tensor
    cost: torch.Tensor

    def thresholds(self, flat: int) -> list[float]:
        index = []
        for c in reversed(self.candidates):
            index.append(flat % c.numel())
            flat //= c.numel()
        return [float(c[i]) for c, i in zip(self.candidates, reversed(index), strict=True)]

    def best(self, target: float, n: int) -> tuple[float, list[float]]:
        """The lowest mean cost with ``correct >= ceil(target * n)`` and its thresholds."""
        need = math.ceil(target * n - 1e-9)
        cost = torch.where(self.correct >= need, self.cost, torch.full_like(self.cost, INF)).reshape(-1)
        flat = int(torch.argmin(cost))
        return float(cost[flat]), self.thresholds(flat)


def exhaustive_grid(oc: GateOutcomes, levels: int | None, chunk: int = 1 << 22) -> Grid:
    """Evaluate every combination of per-gate candidate thresholds.

    Combinations of the first ``G - 1`` gates are enumerated in chunks, exits computed per sample;
    for the last gate, all candidates at once from histograms of the samples that reach it (a sample
    reaching gate ``G - 1`` leaves there under candidate ``c`` iff its score is ``>= cand[c]``).
    Costs as ``evaluate``: exit at gate ``g`` costs ``reach[g]`` plus the costs of the open gates
    ``0..g`` (``t < inf``); the backbone costs ``reach[G]`` plus all open gates.
    """
    G, N = oc.num_gates, oc.num_samples
    cands = [candidates(oc.scores[:, g], levels) for g in range(G)]
    sizes = [c.numel() for c in cands]
    # m[n, g] = number of candidates <= score: sample n passes gate g under candidate c iff c < m[n, g]
    scores = oc.scores.double()
    m = torch.stack([torch.searchsorted(cands[g], scores[:, g].contiguous(), right=True) for g in range(G)], 1)
    right = oc.all_correct().double()  # (N, G + 1)
    reach, gc = oc.reach_costs.double(), oc.gate_costs.double()
    last = G - 1
    S = sizes[last]
    last_open = (torch.arange(S) < S - 1).double()  # the last candidate is +inf: closed
    prefix_sizes = sizes[:last]
    P = math.prod(prefix_sizes)
    B = max(1, chunk // (N * max(1, last)))
    corrects, costs = [], []
    for start in range(0, P, B):
        flat = torch.arange(start, min(P, start + B))
        cols, rest = [], flat
        for sz in reversed(prefix_sizes):
            cols.append(rest % sz)
            rest = rest // sz
        idx = torch.stack(cols[::-1], 1) if cols else torch.zeros(flat.numel(), 0, dtype=torch.long)  # (b, G - 1)
        b = idx.shape[0]
        if last:
            passes = idx[:, None, :] < m[None, :, :last]  # (b, N, G - 1)
            # the exit among the first G - 1 gates, or G - 1: reaches the last gate
            e = torch.where(passes.any(2), passes.to(torch.int8).argmax(2), last)
        else:
            e = torch.full((b, N), last, dtype=torch.long)
        open_pre = (idx < torch.tensor(prefix_sizes, dtype=torch.long) - 1).double()  # (b, G - 1)
        spent_pre = (open_pre * gc[:last]).cumsum(1)  # gate costs paid when leaving at gate g < G - 1
        paid_pre = (open_pre * gc[:last]).sum(1)  # gate costs paid by whoever goes on
        correct_pre = torch.zeros(b, dtype=torch.float64)
        cost_pre = torch.zeros(b, dtype=torch.float64)
        for g in range(last):
            at = (e == g).double()
            correct_pre += (at * right[:, g]).sum(1)
            cost_pre += at.sum(1) * (reach[g] + spent_pre[:, g])
        on = (e == last).double()
        bins = m[:, last].expand(b, N)

        def hist(w: torch.Tensor, bins: torch.Tensor = bins) -> torch.Tensor:
            return torch.zeros(bins.shape[0], S + 1, dtype=torch.float64).scatter_add_(1, bins, w)

        def above(h: torch.Tensor) -> torch.Tensor:  # [:, c] = sum over bins k > c (these leave at the last gate)
            return h.flip(1).cumsum(1).flip(1)[:, 1:]

        def below(h: torch.Tensor) -> torch.Tensor:  # [:, c] = sum over bins k <= c (these go to the backbone)
            return h.cumsum(1)[:, :S]

        h_n, h_gate, h_final = hist(on), hist(on * right[:, last]), hist(on * right[:, G])
        correct = correct_pre[:, None] + above(h_gate) + below(h_final)
        paid = paid_pre[:, None] + gc[last] * last_open[None, :]
        cost = cost_pre[:, None] + above(h_n) * (reach[last] + paid) + below(h_n) * (reach[G] + paid)
        corrects.append(correct.round())
        costs.append(cost / N)
    return Grid(cands, torch.cat(corrects).reshape(sizes), torch.cat(costs).reshape(sizes))


@functools.cache
def synthetic_grid(G: int, seed: int) -> Grid:
    return exhaustive_grid(synthetic_case(G, seed), LEVELS[G])


@functools.cache
def synthetic_search(G: int, seed: int, drop: float) -> OperatingPoint:
    oc = synthetic_case(G, seed)
    return search(oc, oc.backbone_accuracy - drop)


def is_cut(oc: GateOutcomes, thresholds: tuple[float, ...], g: int) -> bool:
    """Gate ``g``'s threshold is +-inf, or a float32 ``t`` that :func:`between` places in the gap of
    two distinct scores ``lo < t <= hi`` of gate ``g`` with no score strictly between them among the
    samples that reach ``g`` under the earlier thresholds: it never splits equal scores, and compared
    in float32 (as the runtime compares) it separates exactly what the search meant to separate.
    (The pair need not be neighbours among the reaching samples: a sweep of gate ``g`` picks a gap
    among the samples reaching it then, and a later move of an earlier gate may take one of them away.)"""
    t = thresholds[g]
    if t in (INF, -INF):
        return True
    if float(torch.tensor(t, dtype=torch.float64).float()) != t:
        return False  # not a float32: the runtime would round it
    s = oc.scores[:, g].double()
    reach = (oc.scores[:, :g] < torch.tensor(thresholds[:g], dtype=torch.float32)).all(1)
    u = torch.unique(s)
    lows = u[u < t]
    highs = u[u >= t]
    if not lows.numel() or not highs.numel():
        return False
    for lo in lows.tolist():
        # between(lo, hi) is the float32 nearest (lo + hi) / 2 (or the next float32 above lo): hi near 2t - lo
        i = int(torch.searchsorted(highs, torch.tensor(2 * t - lo, dtype=torch.float64)))
        for hi in highs[max(0, i - 2) : i + 2].tolist() + ([highs[0].item()] if t == float(
            torch.nextafter(torch.tensor(lo, dtype=torch.float32), torch.tensor(INF))
        ) else []):  # fmt: skip
            if between(lo, hi) == t and not ((s[reach] > lo) & (s[reach] < hi)).any():
                return True
    return False


def check_point(oc: GateOutcomes, p: OperatingPoint, target: float) -> None:
    """A search result is feasible, reports what evaluate() gives, and cuts between distinct scores."""
    assert p.accuracy >= target - 1e-12, (p.accuracy, target)
    again = oc.evaluate(p.thresholds)
    assert (again.accuracy, again.mean_cost, again.exit_fractions) == (p.accuracy, p.mean_cost, p.exit_fractions)
    assert p.cost_ratio == pytest.approx(p.mean_cost / oc.backbone_cost, rel=1e-12)
    assert sum(p.exit_fractions) == pytest.approx(1.0)
    assert p.target == target
    assert all(is_cut(oc, p.thresholds, g) for g in range(oc.num_gates)), p.thresholds


def test_reference_grid_agrees_with_evaluate():
    """The reference itself: sampled combinations (corners included) against evaluate()."""
    gen = torch.Generator().manual_seed(0)
    for G in (1, 2, 3):
        oc = synthetic_case(G, 0)
        grid = synthetic_grid(G, 0)
        assert list(grid.correct.shape) == [c.numel() for c in grid.candidates]
        if G > 1:
            assert [c.numel() for c in grid.candidates] == [LEVELS[G] + 2] * G
        flats = torch.randint(0, grid.correct.numel(), (30,), generator=gen).tolist() + [0, grid.correct.numel() - 1]
        for flat in flats:
            t = grid.thresholds(flat)
            p = oc.evaluate(t)
            assert round(p.accuracy * oc.num_samples) == int(grid.correct.reshape(-1)[flat])
            assert p.mean_cost == pytest.approx(float(grid.cost.reshape(-1)[flat]), rel=1e-12, abs=1e-12)
        # all gates closed is the backbone; all at the first gate costs its reach + its gate
        assert float(grid.cost.reshape(-1)[-1]) == pytest.approx(oc.backbone_cost)
        assert float(grid.cost.reshape(-1)[0]) == pytest.approx(float(oc.reach_costs[0] + oc.gate_costs[0]))


# -- search against the grid and against the sequential rule ------------------------------------------
CASES = [(G, seed, drop) for G in (1, 2, 3) for seed in SEEDS for drop in DROPS]


@pytest.mark.parametrize("G, seed, drop", [pytest.param(*c, id=f"G{c[0]}-seed{c[1]}-drop{c[2]}") for c in CASES])
def test_search_is_at_least_as_cheap_as_the_exhaustive_grid(G, seed, drop):
    oc = synthetic_case(G, seed)
    target = oc.backbone_accuracy - drop
    grid_cost, grid_thresholds = synthetic_grid(G, seed).best(target, oc.num_samples)
    p = synthetic_search(G, seed, drop)
    check_point(oc, p, target)
    assert p.mean_cost <= grid_cost + 1e-9, (p.mean_cost, p.thresholds, grid_cost, grid_thresholds)


@pytest.mark.parametrize("G, seed, drop", [pytest.param(*c, id=f"G{c[0]}-seed{c[1]}-drop{c[2]}") for c in CASES])
def test_search_is_at_least_as_cheap_as_sequential(G, seed, drop):
    oc = synthetic_case(G, seed)
    target = oc.backbone_accuracy - drop
    seq = sequential(oc, target)
    assert seq.accuracy >= target and seq.target == target
    assert oc.evaluate(seq.thresholds).mean_cost == seq.mean_cost
    p = synthetic_search(G, seed, drop)
    assert p.mean_cost <= seq.mean_cost + 1e-12, (p, seq)


def test_search_never_costs_more_than_the_plain_backbone_when_it_meets_the_target():
    """All gates closed reaches the backbone's accuracy at exactly the backbone's cost, so no
    search result for a target at or below the backbone's accuracy may cost more."""
    oc = GateOutcomes(
        scores=torch.tensor([[1.0], [0.0]]),
        correct=torch.tensor([[True], [False]]),
        final_correct=torch.tensor([True, True]),
        reach_costs=torch.tensor([0.5, 1.0], dtype=torch.float64),
        gate_costs=torch.tensor([0.3], dtype=torch.float64),
    )
    closed = oc.evaluate([INF])
    assert (closed.accuracy, closed.mean_cost, closed.cost_ratio) == (1.0, 1.0, 1.0)
    opened = oc.evaluate([0.5])  # the only other feasible choice: sample 0 leaves at the gate
    assert (opened.accuracy, opened.mean_cost) == (1.0, pytest.approx((0.8 + 1.3) / 2))
    p = search(oc, 1.0)
    assert p.mean_cost <= closed.mean_cost + 1e-12, p


# -- the exit rule and costs on a hand-made example ------------------------------------------------------
def tiny() -> GateOutcomes:
    """Five samples, two gates; samples 1 and 2 tie at gate 0."""
    return GateOutcomes(
        scores=torch.tensor([[0.9, 0.3], [0.5, 0.8], [0.5, 0.1], [0.2, 0.7], [0.1, 0.4]]),
        correct=torch.tensor([[True, False], [True, True], [False, True], [False, True], [True, False]]),
        final_correct=torch.tensor([True, False, True, True, True]),
        reach_costs=torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64),
        gate_costs=torch.tensor([0.5, 0.25], dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "thresholds, exits",
    [
        ((0.5, 0.7), [0, 0, 0, 1, 2]),  # score >= threshold leaves: 0.5 takes both tied samples, 0.7 takes sample 3
        ((0.6, 0.7), [0, 1, 2, 1, 2]),
        ((0.35, 0.75), [0, 0, 0, 2, 2]),
        ((0.95, 0.35), [2, 1, 2, 1, 1]),
        ((INF, INF), [2, 2, 2, 2, 2]),  # +inf closes a gate
        ((-INF, INF), [0, 0, 0, 0, 0]),  # -inf takes everyone who reaches the gate
        ((INF, -INF), [1, 1, 1, 1, 1]),
        ((0.15, -INF), [0, 0, 0, 0, 1]),  # the first gate that takes a sample wins
    ],
)
def test_exits(thresholds, exits):
    assert tiny().exits(thresholds).tolist() == exits
    assert tiny().exits(torch.tensor(thresholds)).tolist() == exits


def test_equal_scores_always_exit_together():
    oc = tiny()
    for t in torch.linspace(-0.2, 1.2, 141).tolist():
        e = oc.exits((t, INF)).tolist()
        assert e[1] == e[2], t


@pytest.mark.parametrize(
    "thresholds, accuracy, mean_cost, fractions",
    [
        # both gates open: leaving at gate 0 costs 1 + 0.5, at gate 1 3 + 0.75, the backbone 10 + 0.75
        ((0.5, 0.7), 4 / 5, (3 * 1.5 + 3.75 + 10.75) / 5, (0.6, 0.2, 0.2)),
        # gate 0 closed: not charged
        ((INF, 0.7), 5 / 5, (2 * 3.25 + 3 * 10.25) / 5, (0.0, 0.4, 0.6)),
        # gate 1 closed: not charged, even to those who reach it
        ((0.5, INF), 4 / 5, (3 * 1.5 + 2 * 10.5) / 5, (0.6, 0.0, 0.4)),
        ((INF, INF), 4 / 5, 10.0, (0.0, 0.0, 1.0)),
        ((-INF, INF), 3 / 5, 1.5, (1.0, 0.0, 0.0)),
        ((0.3, -INF), 3 / 5, (3 * 1.5 + 2 * 3.75) / 5, (0.6, 0.4, 0.0)),
    ],
)
def test_evaluate_charges_open_gates_only(thresholds, accuracy, mean_cost, fractions):
    p = tiny().evaluate(thresholds)
    assert p.thresholds == thresholds
    assert p.accuracy == pytest.approx(accuracy, abs=1e-15)
    assert p.mean_cost == pytest.approx(mean_cost, rel=1e-12)
    assert p.cost_ratio == pytest.approx(mean_cost / 10.0, rel=1e-12)
    assert p.exit_fractions == pytest.approx(fractions, abs=1e-15)
    assert p.target is None


def test_outcome_properties():
    oc = tiny()
    assert (oc.num_samples, oc.num_gates, oc.backbone_cost, oc.backbone_accuracy) == (5, 2, 10.0, 0.8)
    assert oc.exit_costs().tolist() == [1.5, 3.75, 10.75]
    assert oc.exit_costs(torch.tensor([False, True])).tolist() == [1.0, 3.25, 10.25]
    assert oc.all_correct()[:, 2].tolist() == [True, False, True, True, True]


def test_search_never_splits_equal_scores():
    """Letting exactly the two highest samples leave would be cheaper and meet the target, but the
    second ties with a wrong one: the only valid cuts are 'the first' and 'the first three'."""
    oc = GateOutcomes(
        scores=torch.tensor([[0.9], [0.6], [0.6], [0.1]]),
        correct=torch.tensor([[True], [True], [False], [True]]),
        final_correct=torch.ones(4, dtype=torch.bool),
        reach_costs=torch.tensor([1.0, 10.0], dtype=torch.float64),
        gate_costs=torch.tensor([0.5], dtype=torch.float64),
    )
    for p in (search(oc, 1.0), sequential(oc, 1.0)):
        assert p.thresholds == (0.75,)  # midway between 0.9 and 0.6
        assert p.exit_fractions == (0.25, 0.75)
        assert p.accuracy == 1.0
        assert p.mean_cost == pytest.approx((1.5 + 3 * 10.5) / 4)
    p = search(oc, 0.75)  # now everyone may leave at the gate (3 of 4 right there)
    assert p.thresholds == (-INF,) and p.mean_cost == 1.5 and p.accuracy == 0.75


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5])
def test_search_on_the_hand_made_example_beats_every_threshold_choice(k):
    """With every distinct-score midpoint as a candidate the grid is exhaustive: search must match it."""
    oc = tiny()
    grid = exhaustive_grid(oc, None)
    f32 = [[-INF, 0.15, 0.35, 0.7, INF], [-INF, 0.2, 0.35, 0.55, 0.75, INF]]  # midpoints of float32 scores
    assert [c.tolist() for c in grid.candidates] == [pytest.approx(c, rel=1e-7) for c in f32]
    target = k / 5
    if grid.correct.max() < math.ceil(target * 5 - 1e-9):
        with pytest.raises(TargetUnreachableError):
            search(oc, target)
        return
    cost, _ = grid.best(target, 5)
    p = search(oc, target)
    check_point(oc, p, target)
    assert p.mean_cost <= cost + 1e-12
    assert p.thresholds[0] in grid.candidates[0].tolist()


def test_max_accuracy_on_the_hand_made_example():
    oc = tiny()
    grid = exhaustive_grid(oc, None)
    best = max_accuracy(oc)
    assert best.accuracy == float(grid.correct.max()) / 5 == 1.0
    assert best.mean_cost <= float(torch.where(grid.correct == 5, grid.cost, INF).min()) + 1e-12


# -- feasibility -----------------------------------------------------------------------------------
@pytest.mark.parametrize("G, seed", [(1, 0), (2, 1), (3, 2)])
def test_unreachable_target(G, seed):
    oc = synthetic_case(G, seed)
    best = max_accuracy(oc)
    grid_best = float(synthetic_grid(G, seed).correct.max()) / oc.num_samples
    if G == 1:
        assert best.accuracy == grid_best  # one gate: the grid holds every choice
    else:
        assert best.accuracy >= grid_best
    assert best.accuracy >= oc.backbone_accuracy
    check_point(oc, search(oc, best.accuracy), best.accuracy)  # reachable
    target = best.accuracy + 1 / oc.num_samples
    with pytest.raises(TargetUnreachableError) as info:
        search(oc, target)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.best_accuracy == best.accuracy
    assert err.backbone_accuracy == oc.backbone_accuracy
    assert str(err) == (
        f"no thresholds reach accuracy {target:.4f} on the calibration split (best reachable {best.accuracy:.4f}, "
        f"backbone {oc.backbone_accuracy:.4f}); lower --target-acc or use --max-drop"
    )


def test_sequential_falls_back_to_the_backbone_when_the_target_is_unreachable_its_way():
    oc = synthetic_case(2, 0)
    p = sequential(oc, 1.0)
    assert p.thresholds == (INF, INF) and p.mean_cost == oc.backbone_cost and p.target == 1.0


@pytest.mark.parametrize("target", [-0.01, 1.01, math.nan, math.inf])
def test_target_outside_0_1(target):
    with pytest.raises(SpecError) as info:
        search(tiny(), target)
    assert str(info.value) == f"target accuracy must be in [0, 1], got {target}"


def test_target_zero_sends_everyone_out_at_the_first_gate():
    for G in (1, 3):
        oc = synthetic_case(G, 0)
        p = search(oc, 0.0)
        assert p.thresholds[0] == -INF and p.exit_fractions[0] == 1.0
        assert p.mean_cost == pytest.approx(float(oc.reach_costs[0] + oc.gate_costs[0]), rel=1e-12)


# -- frontier ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G, seed", [(2, 2), (3, 0)])
def test_frontier(G, seed):
    oc = synthetic_case(G, seed)
    f = frontier(oc)
    pts = f.points
    assert len(pts) >= 5
    assert pts[0].accuracy >= oc.backbone_accuracy - 1e-12
    assert all(a.accuracy > b.accuracy for a, b in zip(pts, pts[1:], strict=False))
    assert all(a.mean_cost > b.mean_cost for a, b in zip(pts, pts[1:], strict=False))
    for p in pts:
        again = oc.evaluate(p.thresholds)
        assert (again.accuracy, again.mean_cost) == (p.accuracy, p.mean_cost)
        assert p.target is not None and p.accuracy >= p.target - 1e-12
    assert [OperatingPoint.from_dict(json.loads(json.dumps(d))) for d in f.to_list()] == pts
    # the drops it was asked for and no more; each no costlier than the sequential rule at its target
    few = frontier(oc, drops=(0.0, 0.02))
    assert 1 <= len(few.points) <= 2
    for p in few.points:
        assert p.mean_cost <= sequential(oc, p.target).mean_cost + 1e-12


# -- scale ------------------------------------------------------------------------------------------------
def test_eight_gates():
    oc = synthetic(8, N=5000, seed=7)
    target = oc.backbone_accuracy - 0.01
    p = search(oc, target)
    check_point(oc, p, target)
    seq = sequential(oc, target)
    assert p.mean_cost <= seq.mean_cost + 1e-12
    assert p.cost_ratio < 1.0


# -- serialisation -----------------------------------------------------------------------------------
def test_operating_point_round_trip():
    p = OperatingPoint((INF, -INF, 0.25), 0.9, 3.5, 0.35, (0.1, 0.2, 0.3, 0.4), target=0.89)
    d = p.to_dict()
    assert d == {
        "thresholds": ["inf", "-inf", 0.25],
        "accuracy": 0.9,
        "mean_cost": 3.5,
        "cost_ratio": 0.35,
        "exit_fractions": [0.1, 0.2, 0.3, 0.4],
        "target": 0.89,
    }
    text = json.dumps(d, allow_nan=False)  # valid JSON: no Infinity
    assert OperatingPoint.from_dict(json.loads(text)) == p
    q = OperatingPoint((0.5,), 1.0, 1.0, 1.0, (1.0, 0.0))
    assert OperatingPoint.from_dict(json.loads(json.dumps(q.to_dict(), allow_nan=False))) == q
    r = search(tiny(), 0.8)
    assert OperatingPoint.from_dict(json.loads(json.dumps(r.to_dict(), allow_nan=False))) == r


@pytest.mark.parametrize("value, encoded", [(INF, "inf"), (-INF, "-inf"), (0.25, 0.25), (0.0, 0.0), (-3.5, -3.5)])
def test_encode_decode_threshold(value, encoded):
    assert encode_threshold(value) == encoded
    assert type(encode_threshold(value)) is type(encoded)
    assert decode_threshold(encoded) == value


def test_decode_threshold_extras():
    assert decode_threshold(None) == INF  # a missing threshold is a closed gate
    assert decode_threshold("0.5") == 0.5
    assert decode_threshold(2) == 2.0 and isinstance(decode_threshold(2), float)


# -- validation ------------------------------------------------------------------------------------
def _outcomes(**changes):
    parts = {
        "scores": torch.zeros(5, 2),
        "correct": torch.zeros(5, 2, dtype=torch.bool),
        "final_correct": torch.zeros(5, dtype=torch.bool),
        "reach_costs": torch.ones(3),
        "gate_costs": torch.ones(2),
    }
    parts.update(changes)
    return GateOutcomes(**parts)


@pytest.mark.parametrize(
    "change, shapes",
    [
        ({"correct": torch.zeros(5, 3, dtype=torch.bool)}, ("(5, 2)", "(5, 3)", "(5,)", "(3,)", "(2,)")),
        ({"correct": torch.zeros(4, 2, dtype=torch.bool)}, ("(5, 2)", "(4, 2)", "(5,)", "(3,)", "(2,)")),
        ({"final_correct": torch.zeros(4, dtype=torch.bool)}, ("(5, 2)", "(5, 2)", "(4,)", "(3,)", "(2,)")),
        ({"final_correct": torch.zeros(5, 1, dtype=torch.bool)}, ("(5, 2)", "(5, 2)", "(5, 1)", "(3,)", "(2,)")),
        ({"reach_costs": torch.ones(2)}, ("(5, 2)", "(5, 2)", "(5,)", "(2,)", "(2,)")),
        ({"gate_costs": torch.ones(3)}, ("(5, 2)", "(5, 2)", "(5,)", "(3,)", "(3,)")),
    ],
)
def test_outcome_shapes(change, shapes):
    with pytest.raises(SpecError) as info:
        _outcomes(**change)
    assert str(info.value) == (
        "inconsistent gate outcomes: scores {}, correct {}, final {}, reach costs {}, gate costs {}".format(*shapes)
    )


def test_outcomes_without_gates_are_the_backbone():
    final = torch.tensor([True, False, True])
    no_gates = torch.zeros(3, 0, dtype=torch.bool)
    oc = GateOutcomes(torch.zeros(3, 0), no_gates, final, torch.tensor([4.0]), torch.zeros(0))
    p = search(oc, 0.5)
    assert p.thresholds == () and p.mean_cost == 4.0 and p.accuracy == pytest.approx(2 / 3)


def test_one_dimensional_scores_are_a_spec_error():
    with pytest.raises(SpecError):
        _outcomes(scores=torch.zeros(5))


def test_evaluate_rejects_the_wrong_number_of_thresholds():
    with pytest.raises(SpecError):
        tiny().evaluate([0.5])


# -- real outcomes: CIFAR-10 ResNet-20 gates -------------------------------------------------------------------
def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """An ImageFolder of symlinks to the first ``per_class`` images of each class (nothing copied)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="module")
def real_outcomes(tmp_path_factory) -> GateOutcomes:
    """Gates fitted on 500 CIFAR 'val' images, outcomes (max score) on 1500 'test' images, built as
    ``dgate calibrate`` builds them."""
    from dgate_cli import cache
    from dgate_cli.pipeline.calibrate import outcomes
    from dgate_cli.pipeline.extract import extract
    from dgate_cli.pipeline.fit import fit, read_gates

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("r20")
        fit_dir = _subset(CIFAR / "val", root / "fit", 50)
        cal_dir = _subset(CIFAR / "test", root / "cal", 150)
        run = root / "run"
        splits = {"train": str(fit_dir), "val": str(cal_dir)}
        extract(run, "cifar_resnet20", splits, weights=str(R20), gates=["layer1", "layer2"], device="cpu", workers=0)
        fit(run, C=0.01)
        gates = read_gates(run)
        oc, _ = outcomes(cache.read_run(run), gates, cache.load_split(run, "val"), gates.names, "max")
    finally:
        torch.set_num_threads(before)
    return oc


_REAL_GRIDS: dict[int, Grid] = {}


def _real_grid(oc: GateOutcomes) -> Grid:
    if id(oc) not in _REAL_GRIDS:
        _REAL_GRIDS[id(oc)] = exhaustive_grid(oc, LEVELS[oc.num_gates])
    return _REAL_GRIDS[id(oc)]


@needs_shared
@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize(
    "drop",
    DROPS,
)
def test_search_on_real_outcomes(real_outcomes, drop):
    oc = real_outcomes
    assert oc.num_gates == 2 and oc.num_samples == 1500
    assert 0.75 < oc.backbone_accuracy < 0.87
    target = oc.backbone_accuracy - drop
    grid_cost, grid_thresholds = _real_grid(oc).best(target, oc.num_samples)
    p = search(oc, target)
    check_point(oc, p, target)
    rel = 1e-9 * oc.backbone_cost
    assert p.mean_cost <= grid_cost + rel, (p.mean_cost, p.thresholds, grid_cost, grid_thresholds)
    assert p.mean_cost <= sequential(oc, target).mean_cost + rel


# -- calibration that holds on new data ---------------------------------------------------------------


def _population(n: int, seed: int) -> GateOutcomes:
    """Two gates whose scores and correctness rise with a hidden easiness; the backbone is right 85% of the time."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    scores = torch.stack([u + 0.3 * torch.randn(n, generator=g), u + 0.2 * torch.randn(n, generator=g)], 1)
    correct = torch.rand(n, 2, generator=g) < torch.stack([0.3 + 0.6 * u, 0.5 + 0.45 * u], 1)
    final = torch.rand(n, generator=g) < 0.85
    reach = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    return GateOutcomes(scores, correct, final, reach, torch.tensor([0.05, 0.05], dtype=torch.float64))


def test_confidence_holds_on_new_data_where_the_plain_search_does_not():
    """Calibrate on 24 samples of 1,000 from a population and check the population's true drop."""
    pop = _population(400_000, 0)
    held = {"confident": 0, "plain": 0, "reserved": 0}
    excess, costs = [], []
    for trial in range(24):
        idx = torch.randint(0, pop.num_samples, (1000,), generator=torch.Generator().manual_seed(100 + trial))
        cal = subset(pop, idx)
        points = {
            "confident": search_confident(cal, 0.9, max_drop=0.02),
            "plain": search(cal, cal.backbone_accuracy - 0.02, polish=False),
            "reserved": search_reserved(cal, cal.backbone_accuracy - 0.02, 2.0),
        }
        for name, p in points.items():
            drop = pop.backbone_accuracy - pop.evaluate(p.thresholds).accuracy
            held[name] += drop <= 0.02
            if name == "reserved":
                excess.append(drop - 0.02)
        costs.append(pop.evaluate(points["confident"].thresholds).cost_ratio)
        assert points["confident"].target == pytest.approx(cal.backbone_accuracy - 0.02)
    assert held["confident"] >= 22  # at least 90% of the time (measured: 24 of 24)
    assert held["plain"] <= 12  # the plain search overfits its split (measured: 6 of 24)
    assert sum(excess) / len(excess) < 0.003  # the reserve: the target holds in expectation (measured: -1.4 points)
    assert sum(costs) / len(costs) < 0.97  # and the confident thresholds still let samples out (measured: 0.91)


def test_confidence_refuses_what_even_the_backbone_cannot_show():
    cal = subset(_population(10_000, 1), torch.arange(200))
    with pytest.raises(TargetUnreachableError, match="cannot be guaranteed with confidence 0.99"):
        search_confident(cal, 0.99, target_acc=0.99)
    with pytest.raises(SpecError, match="--confidence must be in"):
        search_confident(cal, 0.2, max_drop=0.01)
    with pytest.raises(SpecError, match="at least 20 images"):
        search_confident(subset(cal, torch.arange(10)), 0.9, max_drop=0.01)
