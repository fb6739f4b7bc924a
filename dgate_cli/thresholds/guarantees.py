"""Thresholds whose accuracy target holds on new data, not only on the calibration split.

:func:`search_confident` makes the target hold with a stated probability (learn, then test, with
Clopper-Pearson bounds); :func:`search_reserved` keeps a reserve of ``z`` standard deviations of
the discordant samples (:func:`reserve`) above the target."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import SpecError, TargetUnreachableError
from .outcomes import INF, GateOutcomes, OperatingPoint, discordant, subset
from .search import _need, _Searcher, _with_target, lagrangian_path, max_accuracy, search


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
    point = oc.evaluate(t)
    if point.accuracy < target - 1e-12:  # the fallback, every gate closed, does not reach it either (a cascade's gain)
        raise TargetUnreachableError(
            f"no thresholds reach accuracy {target:.4f} with the noise reserve on the calibration split "
            f"(reference {oc.backbone_accuracy:.4f}); lower the target or --reserve",
            best_accuracy=first.accuracy,
            backbone_accuracy=oc.backbone_accuracy,
        )
    return _with_target(point, target)
