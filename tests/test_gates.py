"""Gate estimators: LinearGate reaches the optimum of the objective it documents (checked against
scikit-learn's LinearSVC and LogisticRegression on the same standardised features), folds its
standardisation exactly, warm-starts to the same solution, validates its parameters like
scikit-learn; choose_C picks the C the held-out data asks for; gate_scores on hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from dgate_cli.errors import DgateError, NotFittedError, SpecError
from dgate_cli.gates.linear import DEFAULT_C_GRID, LinearGate, choose_C, holdout_split
from dgate_cli.gates.scores import gate_scores

TORCH_THREADS = 1  # tiny models and many small tensor ops (see conftest._threads)


# -- data and objectives --------------------------------------------------------------------------
def overlapping_blobs(n: int = 3000, d: int = 32, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs that overlap (a linear model gets about 70% right), on raw scales and offsets."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 0.3
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, d))
    X = X * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d) * 2.0  # not standardised
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def blobs():
    X, y = overlapping_blobs()
    Xs = StandardScaler().fit_transform(X.astype(np.float64))  # ddof 0, as LinearGate
    return X, y, Xs


def hinge_objective(W: np.ndarray, b: np.ndarray, Xs: np.ndarray, y: np.ndarray, C: float) -> float:
    """liblinear's primal for one-vs-all squared hinge with the bias penalised (intercept_scaling=1)."""
    Y = -np.ones((len(y), W.shape[0]))
    Y[np.arange(len(y)), y] = 1.0
    m = np.maximum(0.0, 1.0 - Y * (Xs @ W.T + b))
    return float(0.5 * ((W**2).sum() + (b**2).sum()) + C * (m**2).sum())


def ce_objective(W: np.ndarray, b: np.ndarray, Xs: np.ndarray, y: np.ndarray, C: float) -> float:
    """Multinomial logistic regression, bias not penalised (scikit-learn's LogisticRegression)."""
    z = Xs @ W.T + b
    z = z - z.max(1, keepdims=True)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    return float(0.5 * (W**2).sum() + C * nll.sum())


def ours(gate: LinearGate) -> tuple[np.ndarray, np.ndarray]:
    return gate.coef_.double().numpy(), gate.intercept_.double().numpy()


# -- agreement with scikit-learn ------------------------------------------------------------------
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_hinge_matches_liblinear(blobs, C):
    X, y, Xs = blobs
    ref = LinearSVC(loss="squared_hinge", dual=False, C=C, tol=1e-8, max_iter=100_000).fit(Xs, y)
    gate = LinearGate(loss="hinge", C=C).fit(torch.from_numpy(X), torch.from_numpy(y))
    assert gate.coef_.shape == (5, 32) and gate.intercept_.shape == (5,)
    ref_obj = hinge_objective(ref.coef_, ref.intercept_, Xs, y, C)
    our_obj = hinge_objective(*ours(gate), Xs, y, C)
    assert abs(our_obj - ref_obj) <= 1e-3 * ref_obj, (our_obj, ref_obj)
    ref_pred = ref.predict(Xs)
    our_pred = gate.predict(torch.from_numpy(X)).numpy()
    assert (ref_pred == our_pred).mean() >= 0.99
    ref_acc, our_acc = (ref_pred == y).mean(), gate.score(torch.from_numpy(X), torch.from_numpy(y))
    assert abs(our_acc - ref_acc) <= 0.003
    assert 0.55 < our_acc < 0.9  # the data really overlap: the comparison is not between two trivial fits


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_ce_matches_logistic_regression(blobs, C):
    X, y, Xs = blobs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # option renames across scikit-learn versions
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Xs, y)  # lbfgs, multinomial for K > 2
    gate = LinearGate(loss="ce", C=C).fit(torch.from_numpy(X), torch.from_numpy(y))
    ref_obj = ce_objective(ref.coef_, ref.intercept_, Xs, y, C)
    our_obj = ce_objective(*ours(gate), Xs, y, C)
    assert abs(our_obj - ref_obj) <= 1e-3 * ref_obj, (our_obj, ref_obj)
    agreement = (ref.predict(Xs) == gate.predict(torch.from_numpy(X)).numpy()).mean()
    assert agreement >= 0.99


def test_ce_does_not_penalise_the_bias():
    """Shifting every class's bias by the same amount leaves the softmax unchanged, so only an
    unpenalised bias is free to carry the class prior: with one feature of pure noise and a 90/10
    class split, the fitted bias gap must reach the log prior ratio (a penalised bias is shrunk)."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    y = (torch.rand(n, generator=g) < 0.1).long()
    X = torch.randn(n, 1, generator=g)
    gate = LinearGate(loss="ce", C=1e-3).fit(X, y)
    gap = float(gate.intercept_[0] - gate.intercept_[1])
    prior = math.log(float((y == 0).sum()) / float((y == 1).sum()))
    assert gap == pytest.approx(prior, abs=2e-3)


def test_standardisation_statistics(blobs):
    X, y, _ = blobs
    gate = LinearGate(C=0.1).fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_allclose(gate.mean_.numpy(), X.astype(np.float64).mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gate.scale_.numpy(), X.astype(np.float64).std(0, ddof=0), rtol=1e-5)
    assert gate.n_features_in_ == 32 and gate.n_classes_ == 5
    raw = LinearGate(C=0.1, standardize=False).fit(torch.from_numpy(X), torch.from_numpy(y))
    assert torch.equal(raw.mean_, torch.zeros(32)) and torch.equal(raw.scale_, torch.ones(32))


def test_num_classes_beyond_the_labels_seen():
    X = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long()
    gate = LinearGate(C=1.0).fit(X, y, num_classes=4)
    assert gate.coef_.shape == (4, 3) and gate.decision_function(X).shape == (60, 4)
    assert set(gate.predict(X).tolist()) <= {0, 1}  # never-seen classes are never the argmax


def test_constant_feature_is_harmless():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 4, generator=g)
    X[:, 2] = 7.0
    y = (X[:, 0] + X[:, 1] > 0).long()
    gate = LinearGate(C=1.0).fit(X, y)
    assert torch.isfinite(gate.coef_).all() and torch.isfinite(gate.decision_function(X)).all()
    assert gate.score(X, y) > 0.95


# -- folding, warm start ----------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["hinge", "ce"])
def test_folded_matches_standardised_outputs(blobs, loss):
    X, y, _ = blobs
    Xt = torch.from_numpy(X)
    gate = LinearGate(loss=loss, C=0.1).fit(Xt, torch.from_numpy(y))
    W, b = gate.folded()
    assert W.shape == (5, 32) and b.shape == (5,)
    standardised = (Xt.double() - gate.mean_.double()) / gate.scale_.double()
    expected = standardised @ gate.coef_.double().T + gate.intercept_.double()
    got = gate.decision_function(Xt)
    assert got.dtype == torch.float32 and got.shape == (3000, 5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((Xt.double() @ W.double().T + b.double()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["hinge", "ce"])
def test_warm_start_reaches_the_cold_solution(blobs, loss):
    X, y, Xs = blobs
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    objective = hinge_objective if loss == "hinge" else ce_objective
    cold = LinearGate(loss=loss, C=1.0).fit(Xt, yt)
    prev = LinearGate(loss=loss, C=0.01).fit(Xt, yt)
    warm = LinearGate(loss=loss, C=1.0).fit(Xt, yt, init=prev)
    cold_obj, warm_obj = objective(*ours(cold), Xs, y, 1.0), objective(*ours(warm), Xs, y, 1.0)
    assert abs(warm_obj - cold_obj) <= 1e-4 * cold_obj
    # starting at the solution itself: the warm start is really used (few iterations) and stays there
    again = LinearGate(loss=loss, C=1.0).fit(Xt, yt, init=cold)
    assert again.n_iter_ < cold.n_iter_
    assert abs(objective(*ours(again), Xs, y, 1.0) - cold_obj) <= 1e-5 * cold_obj
    assert init_unchanged(prev, LinearGate(loss=loss, C=0.01).fit(Xt, yt))


def init_unchanged(a: LinearGate, b: LinearGate) -> bool:
    """The gate used as init is not modified by the warm-started fit (compared with a refit)."""
    return torch.allclose(a.coef_, b.coef_, atol=1e-5) and torch.allclose(a.intercept_, b.intercept_, atol=1e-5)


def test_warm_start_of_another_shape_is_ignored():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    other = LinearGate(C=1.0).fit(X[:, :4], y)  # D = 4, not 6
    cold = LinearGate(C=1.0).fit(X, y)
    warm = LinearGate(C=1.0).fit(X, y, init=other)
    torch.testing.assert_close(warm.coef_, cold.coef_)
    torch.testing.assert_close(warm.intercept_, cold.intercept_)


# -- validation -----------------------------------------------------------------------------------
def _xy(n: int = 20, d: int = 3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    return X, (X[:, 0] > 0).long()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "foo"}, "The 'loss' parameter of LinearGate must be one of hinge, ce. Got 'foo' instead."),
        ({"C": -1}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got -1 instead."),
        ({"C": 0}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got 0 instead."),
        ({"C": 0.0}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got 0.0 instead."),
        ({"C": math.inf}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got inf instead."),
        ({"C": math.nan}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got nan instead."),
        ({"C": "1"}, "The 'C' parameter of LinearGate must be a float in the range (0, inf). Got '1' instead."),
    ],
)
def test_bad_parameters_raise_at_fit(kwargs, message):
    gate = LinearGate(**kwargs)  # scikit-learn's contract: the constructor only stores
    for k, v in kwargs.items():
        assert getattr(gate, k) is v
    X, y = _xy()
    with pytest.raises(SpecError) as info:
        gate.fit(X, y)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, DgateError)
    assert not hasattr(gate, "coef_")


def test_c_grid_values_are_valid():
    X, y = _xy()
    for C in (1, 1e-4, np.float64(0.5)):
        assert LinearGate(C=C).fit(X, y).coef_.shape == (2, 3)


@pytest.mark.parametrize(
    "X, y, message",
    [
        (torch.zeros(10), torch.zeros(10, dtype=torch.long), "got (10,) and (10,)"),
        (torch.zeros(10, 3), torch.zeros(10, 1, dtype=torch.long), "got (10, 3) and (10, 1)"),
        (torch.zeros(10, 3), torch.zeros(9, dtype=torch.long), "got (10, 3) and (9,)"),
        (torch.zeros(2, 10, 3), torch.zeros(2, dtype=torch.long), "got (2, 10, 3) and (2,)"),
    ],
)
def test_shape_errors(X, y, message):
    with pytest.raises(SpecError) as info:
        LinearGate().fit(X, y)
    assert str(info.value) == "LinearGate.fit needs X of shape (N, D) and y of shape (N,); " + message


def test_no_samples():
    with pytest.raises(SpecError, match=r"^LinearGate.fit got no samples; check the split$"):
        LinearGate().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("method", ["decision_function", "predict", "score", "folded"])
def test_not_fitted(method):
    gate = LinearGate()
    X, y = _xy()
    args = {"decision_function": (X,), "predict": (X,), "score": (X, y), "folded": ()}[method]
    with pytest.raises(NotFittedError) as info:
        getattr(gate, method)(*args)
    assert str(info.value) == (
        "This LinearGate instance is not fitted yet. Call 'fit' with appropriate arguments before using this estimator."
    )
    assert isinstance(info.value, AttributeError) and isinstance(info.value, ValueError)


def test_not_fitted_is_caught_as_attribute_error():
    with pytest.raises(AttributeError):
        LinearGate().decision_function(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        LinearGate().decision_function(torch.zeros(2, 3))


# -- choosing C -----------------------------------------------------------------------------------
def few_samples_many_noise_dims(seed: int, n: int = 300, d: int = 400, k: int = 3):
    """Weak class signal spread over many dimensions, fewer samples than dimensions: an unregularised
    fit interpolates the noise, a strongly regularised one is close to the nearest-mean rule."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    mu = torch.randn(k, d, generator=g) * 0.12
    return mu[y] + torch.randn(n, d, generator=g), y


def signal_in_a_difference(seed: int, n: int = 2000):
    """The class is in x0 - x1 only; both share a large nuisance term. The nearest-mean direction
    (what strong regularisation gives) sees mostly the nuisance, a weakly regularised fit cancels it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z = torch.randn(n, generator=g) * 5
    s = y.float() * 2 - 1
    X = torch.stack([z + s + 0.3 * torch.randn(n, generator=g), z + 0.3 * torch.randn(n, generator=g)], 1)
    return X, y


@pytest.mark.parametrize("seed", [0, 1])
def test_choose_C_prefers_strong_regularisation_when_noise_dominates(seed):
    X, y = few_samples_many_noise_dims(seed)
    r = choose_C(X, y, grid=(1.0, 1e-4), holdout=0.3)
    assert r.grid == (1e-4, 1.0)
    assert len(r.holdout_accuracy) == 2
    assert r.C == 1e-4
    assert r.holdout_accuracy[0] >= r.holdout_accuracy[1] + 0.03


@pytest.mark.parametrize("seed", [0, 1])
def test_choose_C_prefers_weak_regularisation_when_it_must_cancel_a_nuisance(seed):
    X, y = signal_in_a_difference(seed)
    r = choose_C(X, y, grid=(1e-4, 1.0))
    assert r.C == 1.0
    assert r.holdout_accuracy[1] > 0.95 and r.holdout_accuracy[0] < 0.8


def test_choose_C_default_grid_and_holdout_accuracy():
    X, y = signal_in_a_difference(3, n=600)
    r = choose_C(X, y)
    assert r.grid == tuple(sorted(DEFAULT_C_GRID))
    assert r.C in r.grid and len(r.holdout_accuracy) == len(r.grid)
    assert r.holdout_accuracy[r.grid.index(r.C)] == max(r.holdout_accuracy)
    # the held-out accuracy is the accuracy of a gate fitted on the rest (the split is reproducible)
    fit_idx, held_idx = holdout_split(600, 0.1, 0)
    assert len(held_idx) == 60 and len(fit_idx) == 540 and not set(fit_idx.tolist()) & set(held_idx.tolist())
    refit = LinearGate(C=r.C).fit(X[fit_idx], y[fit_idx])
    assert abs(refit.score(X[held_idx], y[held_idx]) - r.holdout_accuracy[r.grid.index(r.C)]) <= 1 / 60 + 1e-9


def test_choose_C_ties_go_to_the_stronger_regularisation():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 2, generator=g)
    y = (X[:, 0] > 0).long()
    X[:, 0] += torch.where(y == 1, 3.0, -3.0)  # separable by a wide gap: every C is perfect
    r = choose_C(X, y, grid=(1.0, 0.01, 0.1))
    assert r.holdout_accuracy == (1.0, 1.0, 1.0)
    assert r.C == 0.01


def test_choose_C_rejects_a_bad_grid_value():
    X, y = _xy(40)
    with pytest.raises(SpecError, match=r"The 'C' parameter of LinearGate .* Got -1.0 instead\."):
        choose_C(X, y, grid=(-1.0, 1.0))


# -- scores ---------------------------------------------------------------------------------------
OUT = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [1.0, 1.0, -2.0]])


def _softmax_row(row: list[float]) -> list[float]:
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def test_score_max():
    s, p = gate_scores(OUT, "max")
    assert s.tolist() == [2.0, 3.0, 1.0]
    assert p.tolist()[:2] == [0, 1] and p.tolist()[2] in (0, 1)


def test_score_margin():
    s, p = gate_scores(OUT, "margin")
    assert s.tolist() == [1.5, 2.0, 0.0]  # a tie at the top has no margin
    assert p.tolist()[:2] == [0, 1]


def test_score_softmax():
    s, p = gate_scores(OUT, "softmax")
    expected = [max(_softmax_row(r)) for r in OUT.tolist()]
    assert s.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0.5)))
    assert p.tolist()[:2] == [0, 1]


def test_score_entropy():
    s, p = gate_scores(OUT, "entropy")
    expected = [sum(q * math.log(q) for q in _softmax_row(r)) for r in OUT.tolist()]
    assert s.tolist() == pytest.approx(expected, rel=1e-6)
    assert all(v < 0 for v in s.tolist())
    assert p.tolist()[:2] == [0, 1]
    uniform, _ = gate_scores(torch.zeros(1, 4), "entropy")
    assert float(uniform[0]) == pytest.approx(-math.log(4), rel=1e-6)  # the least confident possible


def test_scores_rank_confidence_alike():
    """Every score puts a peaked row above a flat one."""
    x = torch.tensor([[5.0, 0.0, 0.0], [0.4, 0.3, 0.2]])
    for name in ("max", "margin", "softmax", "entropy"):
        s, p = gate_scores(x, name)
        assert float(s[0]) > float(s[1]), name
        assert p.tolist() == [0, 0], name


def test_margin_with_a_single_class():
    s, p = gate_scores(torch.tensor([[0.7], [-2.0]]), "margin")
    assert s.tolist() == [math.inf, math.inf]  # no runner-up: always certain
    assert p.tolist() == [0, 0]
    s, _ = gate_scores(torch.tensor([[0.7], [-2.0]]), "softmax")
    assert s.tolist() == [1.0, 1.0]


def test_margin_with_two_classes():
    s, p = gate_scores(torch.tensor([[0.5, -0.25], [-1.0, 2.0]]), "margin")
    assert s.tolist() == [0.75, 3.0] and p.tolist() == [0, 1]


def test_unknown_score():
    with pytest.raises(SpecError) as info:
        gate_scores(OUT, "foo")
    assert str(info.value) == "unknown gate score 'foo'; choose one of max, margin, softmax, entropy"
