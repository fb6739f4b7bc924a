"""Learned exit policies (Bolukbasi et al., "Adaptive Neural Networks for Efficient Inference", ICML
2017): the features a policy reads at an exit, the cost-sensitive weighted logistic regression, its
bottom-up training over the exits of a gated model or a cascade, and out-of-fold scores.

An example's loss at an exit is its error (0/1) plus ``lam`` times the cost of leaving there. Training
labels it "exit" where leaving loses less than going on under the later policies, weighted by the
difference. A policy's score (its logit) is an exit score like any gate score: the threshold search
picks each exit's threshold on it and ``score >= threshold`` leaves.

Example:
    >>> f = exit_features(torch.tensor([[2.0, 0.0, 0.0]]), [torch.tensor([[0.0, 1.0, 0.0]])])
    >>> f.shape == (1, num_features(1)), [round(v, 3) for v in f[0].tolist()]
    (True, [2.0, 2.0, 0.787, 0.68, -0.666, 1.0, 1.0, 0.0, 0.0, 0.0])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SpecError

FEATURES_PER_EXIT = 5  # features of the exit itself
FEATURES_PER_MEMBER = 5  # features per earlier cascade member
DEFAULT_LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)  # trade-off grid (loss units per unit of relative cost)
_CONSTANT = 30.0  # the logit of a policy that always (+) or never (-) exits


def num_features(members_before: int) -> int:
    """Features of an exit after ``members_before`` earlier cascade members (0 in a gated model)."""
    if members_before < 0:
        raise SpecError(f"members_before must be >= 0; got {members_before}")
    return FEATURES_PER_EXIT + FEATURES_PER_MEMBER * members_before


def _top2(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second largest value per row (the largest twice when there is one column)."""
    if v.shape[1] == 1:
        return v[:, 0], v[:, 0]
    top = v.topk(2, dim=1).values
    return top[:, 0], top[:, 1]


def exit_features(z: torch.Tensor, history: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``(N, 5 + 5 * len(history))`` float32 features of one exit, row by row.

    Args:
        z: ``(N, K)`` outputs of the exit (a gate's scores, or a member's logits or log of averaged
            probabilities); finite. With ``p = softmax(z)``: ``z_top1``, ``z_top1 - z_top2``,
            ``p_top1``, ``p_top1 - p_top2``, ``-entropy(p)`` (nats; the top-2 terms are 0 when K == 1).
        history: ``(N, K)`` softmax probabilities of each earlier cascade member's final output, oldest
            first. For each ``q``, with ``pred = z.argmax(1)``: ``q_top1``, ``q_top1 - q_top2``,
            ``-entropy(q)``, ``q[pred]``, ``q.argmax(1) == pred`` (1 or 0).

    A row's features depend on that row alone: any subset of a batch gets the same features.
    """
    if z.dim() != 2 or z.shape[1] == 0:
        raise SpecError(f"exit_features needs z of shape (N, K) with K >= 1; got shape {tuple(z.shape)}")
    z = z.detach().float()
    logp = z - torch.logsumexp(z, 1, keepdim=True)
    p = logp.exp()
    z1, z2 = _top2(z)
    p1, p2 = _top2(p)
    neg_entropy = torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1)
    cols = [z1, z1 - z2, p1, p1 - p2, neg_entropy]
    pred = z.argmax(1, keepdim=True)
    for i, q in enumerate(history):
        if q.shape != z.shape:
            raise SpecError(
                f"exit_features: history[{i}] has shape {tuple(q.shape)} but z has {tuple(z.shape)}; pass each earlier member's (N, K) probabilities"
            )
        q = q.detach().to(z.device, torch.float32)
        q1, q2 = _top2(q)
        agree = (q.argmax(1, keepdim=True) == pred)[:, 0].float()
        cols += [q1, q1 - q2, torch.xlogy(q, q).sum(1), q.gather(1, pred)[:, 0], agree]
    return torch.stack(cols, 1)


@dataclass(frozen=True)
class FittedPolicy:
    """One exit's policy: a linear score on raw (unstandardised) features; ``score >= 0`` exits.

    Attributes:
        weight: ``(F,)`` float32 weights, the fit's standardisation folded in.
        bias: the intercept.
    """

    weight: torch.Tensor
    bias: float

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weight).detach().to("cpu", torch.float32).contiguous()
        if w.dim() != 1:
            raise SpecError(f"a policy's weight must be 1-D (one per feature); got shape {tuple(w.shape)}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", float(self.bias))

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[0])

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 scores ``features @ weight + bias`` of ``(N, F)`` features."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise SpecError(
                f"a policy over {self.num_features} features got features of shape {tuple(features.shape)}; pass (N, {self.num_features}) from exit_features"
            )
        return features.float() @ self.weight.to(features.device) + self.bias

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FittedPolicy):
            return NotImplemented
        return self.bias == other.bias and torch.equal(self.weight, other.weight)

    def __hash__(self) -> int:
        return hash((tuple(self.weight.tolist()), self.bias))

    def to_dict(self) -> dict[str, Any]:
        return {"weight": [float(v) for v in self.weight.tolist()], "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FittedPolicy:
        if not isinstance(d, dict) or "weight" not in d or "bias" not in d:
            raise SpecError("a policy needs 'weight' and 'bias' entries; write it with FittedPolicy.to_dict")
        return cls(torch.tensor([float(v) for v in d["weight"]], dtype=torch.float32), float(d["bias"]))


def _constant(num_feats: int, exit_: bool) -> FittedPolicy:
    return FittedPolicy(torch.zeros(num_feats), _CONSTANT if exit_ else -_CONSTANT)


def fit_weighted_logistic(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, C: float = 1.0, max_iter: int = 100
) -> FittedPolicy:
    """Weighted L2-regularised logistic regression; ``y`` true means "exit".

    Minimises ``sum_i w_i log(1 + exp(-s_i f(x_i))) / sum(w) + ||beta||^2 / (2 C N)`` (``s_i = +-1``,
    the bias not regularised) on features standardised with their ``w``-weighted mean and std (std 0
    -> 1), with L-BFGS (strong Wolfe) in float64, and folds the standardisation into the weights. ``N``
    counts the samples of positive weight, so samples of weight 0 change nothing.

    If every weight is 0 or every sample of positive weight has the same label, the policy is constant:
    weight 0, bias +30 for "exit", -30 for "continue" (all weights 0: the majority label; ties continue).
    """
    if x.dim() != 2 or tuple(y.shape) != (x.shape[0],) or tuple(w.shape) != (x.shape[0],):
        raise SpecError(
            f"fit_weighted_logistic needs x of shape (N, F), y and w of shape (N,); got {tuple(x.shape)}, {tuple(y.shape)} and {tuple(w.shape)}"
        )
    if x.shape[0] == 0:
        raise SpecError("fit_weighted_logistic got no samples; check the split")
    if not (C > 0 and math.isfinite(C)):
        raise SpecError(f"C must be a finite number > 0; got {C}")
    if max_iter < 1:
        raise SpecError(f"max_iter must be >= 1; got {max_iter}")
    f64 = torch.float64
    X = x.detach().to("cpu", f64)
    yb = y.detach().cpu() != 0
    wd = w.detach().to("cpu", f64)
    if not torch.isfinite(X).all():
        raise SpecError(
            "fit_weighted_logistic got non-finite features; clamp the exit outputs (e.g. log(p.clamp_min(1e-30)))"
        )
    if not torch.isfinite(wd).all() or (wd < 0).any():
        raise SpecError("fit_weighted_logistic got negative or non-finite weights; weights must be finite and >= 0")
    pos = wd > 0
    if not pos.any():
        return _constant(X.shape[1], 2 * int(yb.sum()) > yb.numel())
    if yb[pos].all() or not yb[pos].any():
        return _constant(X.shape[1], bool(yb[pos][0]))
    wn = wd / wd.sum()
    mean = wn @ X
    std = (wn @ (X - mean).square()).sqrt()
    flat = std <= 1e-9 * mean.abs().clamp_min(1.0)
    std = torch.where(flat, torch.ones_like(std), std)
    Xs = ((X - mean) / std).masked_fill(flat, 0.0)
    s = yb.to(f64) * 2 - 1
    reg = 1.0 / (C * int(pos.sum()))
    share = float(wn[yb].sum())
    beta = torch.zeros(X.shape[1], dtype=f64, requires_grad=True)
    b = torch.tensor([math.log(share / (1 - share))], dtype=f64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [beta, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        """Value and gradient by hand (no autograd graph)."""
        with torch.no_grad():
            m = s * (Xs @ beta + b)
            value = (wn * F.softplus(-m)).sum() + 0.5 * reg * beta.square().sum()
            g = -wn * s * torch.sigmoid(-m)
            beta.grad = Xs.t() @ g + reg * beta
            b.grad = g.sum().reshape(1)
        return value

    opt.step(closure)
    weight = beta.detach() / std
    return FittedPolicy(weight.float(), float(b.detach()[0] - weight @ mean))


def _check_problem(
    features: Sequence[torch.Tensor], correct: torch.Tensor, exit_costs: torch.Tensor, lam: float
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Validated (float32 features on the CPU, bool correct, float64 costs)."""
    G = len(features)
    correct = torch.as_tensor(correct)
    if correct.dim() != 2 or correct.shape[1] != G + 1:
        raise SpecError(
            f"correct must have shape (N, G + 1) = (N, {G + 1}) for {G} exits (the last column is the final answer); got {tuple(correct.shape)}"
        )
    N = correct.shape[0]
    if N == 0:
        raise SpecError("learned exit policies got no samples; check the split")
    for g, f in enumerate(features):
        if f.dim() != 2 or f.shape[0] != N:
            raise SpecError(f"features[{g}] must have shape (N, F) with N = {N} like correct; got {tuple(f.shape)}")
    costs = torch.as_tensor(exit_costs).detach().to("cpu", torch.float64)
    if tuple(costs.shape) != (G + 1,) or not torch.isfinite(costs).all():
        raise SpecError(
            f"exit_costs must hold G + 1 = {G + 1} finite costs (one per exit, then the end); got shape {tuple(costs.shape)}"
        )
    if not (lam >= 0 and math.isfinite(lam)):
        raise SpecError(f"lam must be a finite number >= 0; got {lam}")
    return [f.detach().to("cpu", torch.float32) for f in features], correct.cpu() != 0, costs


def fit_policies(
    features: Sequence[torch.Tensor], correct: torch.Tensor, exit_costs: torch.Tensor, lam: float, C: float = 1.0
) -> list[FittedPolicy]:
    """One policy per exit, trained bottom-up (last exit first).

    Args:
        features: ``(N, F_g)`` features of each exit ``g = 0..G-1`` (``F_g`` may differ per exit).
        correct: ``(N, G + 1)`` bool, whether each exit is right; column ``G`` is the final answer.
        exit_costs: ``(G + 1,)`` cost of leaving at each exit (cumulative, relative to a reference).
        lam: loss units per unit of cost; larger values exit earlier.
        C: inverse regularisation strength of every fit.

    With ``V = error[:, G] + lam * cost[G]``, from the last exit down: ``L = error[:, g] + lam * cost[g]``,
    label "exit" where ``L < V``, weight ``|L - V|``; then ``V = L`` where the fitted policy exits.

    Example:
        >>> ok = torch.tensor([[1, 1], [0, 1]]).bool().repeat(100, 1)  # exit 0 right on every other sample
        >>> p = fit_policies([ok[:, :1].float()], ok, torch.tensor([0.3, 1.0]), lam=0.1)
        >>> (p[0].score(ok[:4, :1].float()) >= 0).tolist()
        [True, False, True, False]
    """
    feats, ok, costs = _check_problem(features, correct, exit_costs, lam)
    G = len(feats)
    err = (~ok).to(torch.float64)
    V = err[:, G] + lam * costs[G]
    policies: list[FittedPolicy] = []
    for g in range(G - 1, -1, -1):
        L = err[:, g] + lam * costs[g]
        policy = fit_weighted_logistic(feats[g], L < V, (L - V).abs(), C=C)
        V = torch.where(policy.score(feats[g]) >= 0, L, V)
        policies.append(policy)
    return policies[::-1]


def policy_scores(policies: Sequence[FittedPolicy], features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, G)`` float32 scores of each exit's policy on its features (``(0, 0)`` when G == 0)."""
    if len(policies) != len(features):
        raise SpecError(
            f"policy_scores got {len(policies)} policies for {len(features)} feature matrices; pass one per exit"
        )
    if not policies:
        return torch.zeros(0, 0)
    if len({f.shape[0] for f in features}) > 1:
        raise SpecError(
            f"policy_scores needs the same samples at every exit; got rows {[f.shape[0] for f in features]}"
        )
    return torch.stack([p.score(f) for p, f in zip(policies, features, strict=True)], 1)


def cross_fit_scores(
    features: Sequence[torch.Tensor],
    correct: torch.Tensor,
    exit_costs: torch.Tensor,
    lam: float,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> torch.Tensor:
    """``(N, G)`` float32 out-of-fold policy scores: what the threshold search may calibrate on.

    Samples are dealt into ``folds`` folds by a permutation seeded with ``seed``; each fold is scored by
    policies fitted (:func:`fit_policies`) on the other folds, so no score depends on its own label.
    """
    feats, ok, costs = _check_problem(features, correct, exit_costs, lam)
    N, G = ok.shape[0], len(feats)
    if not 2 <= folds <= N:
        raise SpecError(f"folds must be between 2 and the number of samples ({N}); got {folds}")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(N, dtype=torch.long)
    fold[perm] = torch.arange(N) % folds
    out = torch.zeros(N, G)
    if G == 0:
        return out
    for k in range(folds):
        held = fold == k
        policies = fit_policies([f[~held] for f in feats], ok[~held], costs, lam, C)
        out[held] = policy_scores(policies, [f[held] for f in feats])
    return out
