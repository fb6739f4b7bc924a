"""Learned exit policies: exit features on a hand-computed example and row by row; the weighted
logistic regression (separable data, zero weights, the folded standardisation against the optimality
conditions of its objective and against scikit-learn, the constant policies); bottom-up training on
a constructed example whose best decisions are known; out-of-fold scores; (de)serialisation; validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgate_cli.errors import SpecError
from dgate_cli.gates.policy import (
    DEFAULT_LAMBDAS,
    FittedPolicy,
    cross_fit_scores,
    exit_features,
    fit_policies,
    fit_weighted_logistic,
    num_features,
    policy_scores,
)

TORCH_THREADS = 1  # many tiny tensor ops (see conftest._threads)


# -- exit features -----------------------------------------------------------------------------------
def test_exit_features_match_a_hand_computed_example():
    z = torch.tensor([[2.0, 0.0, 0.0]])
    q = torch.tensor([[0.2, 0.7, 0.1]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    f = exit_features(z, [q, one_hot])
    assert f.shape == (1, num_features(2)) == (1, 15) and f.dtype == torch.float32
    e2 = math.exp(2.0)
    p = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    neg_entropy = sum(v * math.log(v) for v in p)
    exit_part = [2.0, 2.0, p[0], p[0] - p[1], neg_entropy]
    q_part = [0.7, 0.5, 0.2 * math.log(0.2) + 0.7 * math.log(0.7) + 0.1 * math.log(0.1), 0.2, 0.0]
    one_hot_part = [1.0, 1.0, 0.0, 1.0, 1.0]  # entropy 0, the member agrees with the exit (class 0)
    assert f[0].tolist() == pytest.approx(exit_part + q_part + one_hot_part, abs=1e-6)


def test_exit_features_of_a_single_output_have_no_top2_terms():
    f = exit_features(torch.tensor([[3.0], [-1.0]]), [torch.ones(2, 1)])
    member = [1.0, 0.0, 0.0, 1.0, 1.0]  # q = 1: no margin, no entropy, q[pred] = 1, agrees
    assert f.tolist() == [[3.0, 0.0, 1.0, 0.0, 0.0] + member, [-1.0, 0.0, 1.0, 0.0, 0.0] + member]


@pytest.mark.parametrize("members", [0, 1, 3])
def test_exit_features_shape(members):
    g = torch.Generator().manual_seed(members)
    z = torch.randn(4, 6, generator=g)
    hist = [torch.softmax(torch.randn(4, 6, generator=g), 1) for _ in range(members)]
    assert exit_features(z, hist).shape == (4, num_features(members)) == (4, 5 + 5 * members)


def test_exit_features_are_computed_row_by_row():
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(64, 10, generator=g)
    hist = [torch.softmax(3 * torch.randn(64, 10, generator=g), 1) for _ in range(2)]
    full = exit_features(z, hist)
    assert torch.isfinite(full).all()
    for idx in (torch.randperm(64, generator=g)[:7], torch.tensor([5]), torch.arange(1, 64, 2)):
        part = exit_features(z[idx], [q[idx] for q in hist])
        assert torch.allclose(part, full[idx], atol=1e-6, rtol=0)


def test_exit_features_refuse_bad_shapes():
    with pytest.raises(SpecError, match="shape"):
        exit_features(torch.zeros(5))
    with pytest.raises(SpecError, match=r"history\[1\]"):
        exit_features(torch.zeros(5, 3), [torch.zeros(5, 3), torch.zeros(4, 3)])
    with pytest.raises(SpecError, match="members_before"):
        num_features(-1)


# -- weighted logistic regression --------------------------------------------------------------------
def noisy_problem(n: int = 300, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.tensor([1.0, 5.0, 0.1])[:d] + torch.tensor([3.0, -2.0, 10.0])[:d]
    y = (x[:, 0] - 3 + 0.2 * (x[:, 1] + 2) + torch.randn(n, generator=g)) > 0
    w = 0.1 + torch.rand(n, generator=g)
    return x, y, w


def test_separable_data_is_separated():
    x = torch.cat([torch.linspace(-3, -1, 20), torch.linspace(1, 3, 20)])[:, None]
    w = 0.5 + torch.rand(40, generator=torch.Generator().manual_seed(1))
    for y in (x[:, 0] > 0, x[:, 0] < 0):
        policy = fit_weighted_logistic(x, y, w)
        assert torch.equal(policy.score(x) >= 0, y)


def test_samples_of_weight_zero_change_nothing():
    x, y, w = noisy_problem()
    base = fit_weighted_logistic(x, y, w)
    extra = 10 * x[:50] + 7  # far away, wrongly labelled, weight 0
    padded = fit_weighted_logistic(torch.cat([x, extra]), torch.cat([y, ~y[:50]]), torch.cat([w, torch.zeros(50)]))
    assert torch.allclose(padded.weight, base.weight, atol=1e-5, rtol=0)
    assert padded.bias == pytest.approx(base.bias, abs=1e-5)
    assert base.weight.abs().max() > 0.1  # a real fit, not a constant


def standardised(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    X, wn = x.double(), w.double() / w.double().sum()
    mean = wn @ X
    std = (wn @ (X - mean) ** 2).sqrt()
    return (X - mean) / std, mean, std


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_the_folded_policy_solves_the_standardised_problem(C):
    x, y, w = noisy_problem()
    policy = fit_weighted_logistic(x, y, w, C=C)
    Xs, mean, std = standardised(x, w)
    beta = policy.weight.double() * std  # back to the standardised coordinates
    b = policy.bias + float(policy.weight.double() @ mean)
    assert torch.allclose(policy.score(x).double(), Xs @ beta + b, atol=1e-4, rtol=0)
    # the optimality conditions of sum w l / sum w + ||beta||^2 / (2 C N), bias unpenalised
    s = y.double() * 2 - 1
    wn = w.double() / w.double().sum()
    g = -wn * s * torch.sigmoid(-s * (Xs @ beta + b))
    assert (Xs.t() @ g + beta / (C * len(y))).abs().max() < 1e-4 and abs(float(g.sum())) < 1e-5
    # an affine change of the features changes nothing: the standardisation absorbs it
    moved = fit_weighted_logistic(x * torch.tensor([-3.0, 0.5, 20.0]) + 4.0, y, w, C=C)
    assert torch.allclose(moved.score(x * torch.tensor([-3.0, 0.5, 20.0]) + 4.0), policy.score(x), atol=1e-4)


def test_the_fit_matches_scikit_learn_on_standardised_features():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y, w = noisy_problem()
    C = 0.5
    policy = fit_weighted_logistic(x, y, w, C=C)
    Xs, _, _ = standardised(x, w)
    # sum w l / W + ||beta||^2 / (2 C N) times C N: sklearn's C' sum w l + ||beta||^2 / 2, C' = C N / W
    ref = linear_model.LogisticRegression(C=C * len(y) / float(w.double().sum()), tol=1e-12, max_iter=10_000)
    ref.fit(Xs.numpy(), y.numpy(), sample_weight=w.double().numpy())
    expected = torch.from_numpy(ref.decision_function(Xs.numpy()))
    assert torch.allclose(policy.score(x).double(), expected, atol=1e-4, rtol=0)


def test_degenerate_problems_give_constant_policies():
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    mixed = torch.tensor([True, False, True, False, False, False])
    cases = [
        (mixed, torch.zeros(6), -30.0),  # no weight at all: the majority (continue)
        (mixed, mixed.float(), 30.0),  # every sample of positive weight says exit
        (mixed, (~mixed).float() * 2, -30.0),  # every sample of positive weight says continue
    ]
    for y, w, bias in cases:
        policy = fit_weighted_logistic(x, y, w)
        assert policy.bias == bias and torch.equal(policy.weight, torch.zeros(2))
        assert torch.equal(policy.score(x), torch.full((6,), bias))


def test_fit_weighted_logistic_refuses_bad_arguments():
    x, y, w = noisy_problem(20)
    with pytest.raises(SpecError, match="shape"):
        fit_weighted_logistic(x, y[:-1], w)
    with pytest.raises(SpecError, match="shape"):
        fit_weighted_logistic(x[:, 0], y, w)
    with pytest.raises(SpecError, match="negative"):
        fit_weighted_logistic(x, y, -w)
    with pytest.raises(SpecError, match="C must"):
        fit_weighted_logistic(x, y, w, C=0.0)
    with pytest.raises(SpecError, match="non-finite features"):
        fit_weighted_logistic(x.index_fill(0, torch.tensor([3]), -math.inf), y, w)
    with pytest.raises(SpecError, match="no samples"):
        fit_weighted_logistic(x[:0], y[:0], w[:0])


# -- the policy object -------------------------------------------------------------------------------
def test_policy_round_trips_through_strict_json():
    policy = FittedPolicy(torch.tensor([0.1, -2.5, 3.0]), 0.25)
    d = json.loads(json.dumps(policy.to_dict(), allow_nan=False))
    assert set(d) == {"weight", "bias"} and FittedPolicy.from_dict(d) == policy
    assert hash(FittedPolicy.from_dict(d)) == hash(policy) and policy != FittedPolicy(policy.weight, 0.5)
    assert policy.score(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])).tolist() == pytest.approx([0.85, 0.25])
    with pytest.raises(SpecError, match="features"):
        policy.score(torch.zeros(2, 4))
    with pytest.raises(SpecError, match="'weight' and 'bias'"):
        FittedPolicy.from_dict({"weight": [1.0]})


# -- bottom-up training ------------------------------------------------------------------------------
COSTS = torch.tensor([0.2, 0.5, 1.0])


def every_combination(repeat: int = 6) -> torch.Tensor:
    """(8 * repeat, 3) bool: every pattern of right/wrong at exit 0, exit 1 and the end."""
    rows = [[bool(i & 4), bool(i & 2), bool(i & 1)] for i in range(8)]
    return torch.tensor(rows).repeat(repeat, 1)


def test_policies_exit_where_leaving_is_best():
    ok = every_combination()
    feats = [ok[:, g:].float() for g in range(2)]  # each exit sees whether it and every later exit is right
    # weak regularisation: leaving exit 0 when everything later is wrong gains 0.03 only, which the
    # default C overrides on 48 samples
    policies = fit_policies(feats, ok, COSTS, lam=0.1, C=100.0)
    assert [p.num_features for p in policies] == [3, 2]
    c0, c1, c2 = ok.unbind(1)
    # lam = 0.1: losses are error + (0.02, 0.05, 0.1). Exit 1 leaves when right (0.05 beats 0.1 and 1.1)
    # or when the end is wrong too (1.05 < 1.1); exit 0 then leaves when right (0.02 is the least),
    # or when exits 1 and the end are both wrong (1.02 < 1.05, what exit 1 would pay)
    expected = [c0 | (~c1 & ~c2), c1 | ~c2]
    for g, policy in enumerate(policies):
        assert torch.equal(policy.score(feats[g]) >= 0, expected[g]), g
    scores = policy_scores(policies, feats)
    assert scores.shape == (48, 2) and torch.equal(scores[:, 1], policies[1].score(feats[1]))


def test_policies_depend_on_the_later_ones():
    # exit 0 sees only whether it is right; when wrong it leaves only if later is wrong everywhere, so
    # with the end always right and exit 1 always wrong it must stay, and leave for a wrong end
    ok = every_combination()
    ok[:, 1] = False
    feats = [ok[:, :1].float(), torch.zeros(48, 1)]
    for end, leave_when_wrong in ((True, False), (False, True)):
        ok[:, 2] = end
        p0 = fit_policies(feats, ok, COSTS, lam=0.1)[0]
        assert torch.equal(p0.score(feats[0]) >= 0, ok[:, 0] | leave_when_wrong)


def test_a_huge_lambda_sends_everyone_out_at_the_first_exit():
    ok = every_combination()
    feats = [ok[:, g:].float() for g in range(2)]
    scores = policy_scores(fit_policies(feats, ok, COSTS, lam=1e4), feats)
    assert (scores >= 0).all()


def test_fit_policies_refuses_bad_arguments():
    ok = every_combination(1)
    feats = [ok[:, :1].float(), ok[:, 1:2].float()]
    with pytest.raises(SpecError, match="correct"):
        fit_policies(feats, ok[:, :2], COSTS, lam=0.1)
    with pytest.raises(SpecError, match="exit_costs"):
        fit_policies(feats, ok, COSTS[:2], lam=0.1)
    with pytest.raises(SpecError, match=r"features\[1\]"):
        fit_policies([feats[0], feats[1][:5]], ok, COSTS, lam=0.1)
    with pytest.raises(SpecError, match="lam"):
        fit_policies(feats, ok, COSTS, lam=-0.1)
    with pytest.raises(SpecError, match="policies"):
        policy_scores([FittedPolicy(torch.zeros(1), 0.0)], feats)
    assert min(DEFAULT_LAMBDAS) > 0 and list(DEFAULT_LAMBDAS) == sorted(DEFAULT_LAMBDAS)


# -- out-of-fold scores ------------------------------------------------------------------------------
def cascade_problem(n: int = 150, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ease = torch.randn(n, generator=g)
    ok = torch.rand(n, 3, generator=g) < torch.sigmoid(ease[:, None] + torch.tensor([-0.5, 0.5, 1.5]))
    logits = [3 * torch.randn(n, 4, generator=g) + 2 * ok[:, g_, None] * torch.eye(4)[0] for g_ in range(2)]
    feats = [exit_features(logits[0]), exit_features(logits[1], [torch.softmax(logits[0], 1)])]
    return feats, ok


def test_cross_fit_scores_are_out_of_fold_and_deterministic():
    feats, ok = cascade_problem()
    scores = cross_fit_scores(feats, ok, COSTS, lam=0.1, folds=3)
    assert scores.shape == (150, 2) and scores.dtype == torch.float32
    assert torch.equal(cross_fit_scores(feats, ok, COSTS, lam=0.1, folds=3), scores)
    assert not torch.equal(cross_fit_scores(feats, ok, COSTS, lam=0.1, folds=3, seed=1), scores)
    for i in (0, 77):
        flipped = ok.clone()
        flipped[i] = ~flipped[i]
        other = cross_fit_scores(feats, flipped, COSTS, lam=0.1, folds=3)
        assert torch.equal(other[i], scores[i])  # a sample's score never sees its own label
        assert not torch.equal(other, scores)  # but its label moves the scores of other folds


def test_cross_fit_scores_refuse_bad_folds():
    feats, ok = cascade_problem(10)
    with pytest.raises(SpecError, match="folds"):
        cross_fit_scores(feats, ok, COSTS, lam=0.1, folds=1)
    with pytest.raises(SpecError, match="folds"):
        cross_fit_scores(feats, ok, COSTS, lam=0.1, folds=11)
    with pytest.raises(SpecError, match="correct"):
        cross_fit_scores(feats, ok[:, :2], COSTS, lam=0.1)
