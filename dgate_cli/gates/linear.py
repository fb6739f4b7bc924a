"""Gate estimators: one linear layer on pooled stage features, with a scikit-learn-like contract.

``LinearGate(loss="hinge")`` is the d-gate: K one-vs-all linear SVMs sharing the feature matrix,
trained with the squared hinge loss and L2 regularisation (the objective of scikit-learn's
``LinearSVC(loss="squared_hinge")``, bias penalised as liblinear does), so ``w·x + b`` is a signed
(scaled) distance to each class boundary. ``LinearGate(loss="ce")`` is multinomial logistic
regression (softmax + cross-entropy; bias not penalised, as scikit-learn's ``LogisticRegression``).
Both are solved full-batch with L-BFGS on standardised features; :meth:`LinearGate.folded` folds the
standardisation back into the weights for export."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._io import AsDict
from ..errors import NotFittedError, SpecError

LOSSES = ("hinge", "ce")


DEFAULT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _check_params(loss: str, C: float) -> None:
    if loss not in LOSSES:
        raise SpecError(f"The 'loss' parameter of LinearGate must be one of {', '.join(LOSSES)}. Got {loss!r} instead.")
    if not (isinstance(C, (int, float)) and C > 0 and math.isfinite(C)):
        raise SpecError(f"The 'C' parameter of LinearGate must be a float in the range (0, inf). Got {C!r} instead.")


class LinearGate:
    """A linear one-vs-all (hinge) or softmax (ce) classifier on gate features.

    Args:
        loss: ``hinge`` (squared hinge, one-vs-all; the d-gate) or ``ce`` (softmax cross-entropy).
        C: inverse regularisation strength, as in scikit-learn.
        max_iter: L-BFGS iterations at most.
        tol: stop when the gradient's largest entry falls below this (objective scaled per sample).
        standardize: standardise features to zero mean and unit variance first.
        device: where to solve (``cpu`` or ``cuda``).

    Attributes (after :meth:`fit`):
        coef_: ``(K, D)`` weights on standardised features.
        intercept_: ``(K,)`` biases.
        mean_, scale_: the standardisation.
        n_iter_: L-BFGS iterations run.
        fit_seconds_: wall time of the fit.

    Example:
        >>> X = torch.randn(200, 5); y = (X[:, 0] > 0).long()
        >>> gate = LinearGate(C=1.0).fit(X, y, num_classes=2)
        >>> float((gate.predict(X) == y).float().mean()) > 0.95
        True
    """

    def __init__(
        self,
        loss: str = "hinge",
        C: float = 1.0,
        max_iter: int = 500,
        tol: float = 1e-5,
        standardize: bool = True,
        device: str = "cpu",
    ):
        self.loss = loss
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.device = device

    # -- scikit-learn's estimator contract ----------------------------------------------------------
    _PARAMS = ("loss", "C", "max_iter", "tol", "standardize", "device")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn's ``clone`` and grid searches read them.

        Example:
            >>> LinearGate(C=0.1).get_params()["C"]
            0.1
        """
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> LinearGate:
        """Set constructor arguments (checked when :meth:`fit` runs); returns ``self``.

        Example:
            >>> LinearGate().set_params(loss="ce", C=0.01)
            LinearGate(loss='ce', C=0.01)
        """
        for name, value in params.items():
            if name not in self._PARAMS:
                raise SpecError(
                    f"Invalid parameter {name!r} for estimator LinearGate. Valid parameters are: {', '.join(self._PARAMS)}."
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = LinearGate.__init__.__defaults__ or ()
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, default in zip(self._PARAMS, defaults, strict=True)
            if getattr(self, name) != default
        ]
        return f"LinearGate({', '.join(changed)})"

    # -- fitting ----------------------------------------------------------------------------------
    def fit(
        self, X: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, init: LinearGate | None = None
    ) -> LinearGate:
        """Fit on features ``X`` (N, D) and integer targets ``y`` (N,); returns ``self``.

        Args:
            num_classes: K (default: ``y.max() + 1``).
            init: a fitted gate of the same shape to warm-start from (e.g. the previous C).
        """
        _check_params(self.loss, self.C)
        if X.dim() != 2 or y.dim() != 1 or X.shape[0] != y.shape[0]:
            raise SpecError(
                f"LinearGate.fit needs X of shape (N, D) and y of shape (N,); got {tuple(X.shape)} and {tuple(y.shape)}"
            )
        if X.shape[0] == 0:
            raise SpecError("LinearGate.fit got no samples; check the split")
        t0 = time.perf_counter()
        dev = torch.device(self.device)
        K = int(num_classes if num_classes is not None else int(y.max()) + 1)
        Xd = X.to(dev, torch.float32)
        if self.standardize:
            mean = Xd.mean(0)
            scale = Xd.std(0, unbiased=False).clamp_min(1e-6)
            Xd = (Xd - mean) / scale
        else:
            mean = torch.zeros(X.shape[1], device=dev)
            scale = torch.ones(X.shape[1], device=dev)
        yd = y.to(dev)
        n, d = Xd.shape
        W = torch.zeros(d, K, device=dev)
        b = torch.zeros(K, device=dev)
        if init is not None and getattr(init, "coef_", None) is not None and init.coef_.shape == (K, d):
            W = init.coef_.t().contiguous().to(dev).clone()
            b = init.intercept_.to(dev).clone()
        W.requires_grad_(True)
        b.requires_grad_(True)
        reg = 1.0 / (self.C * n)
        Y = torch.full((n, K), -1.0, device=dev)
        Y[torch.arange(n, device=dev), yd] = 1.0
        hinge = self.loss == "hinge"

        def objective_and_grad() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Value and gradient by hand: no autograd graph, and ``(G^T X)^T`` (fast) for ``X^T G``."""
            z = torch.addmm(b, Xd, W)
            if hinge:
                m = (1.0 - Y * z).clamp_min_(0.0)
                value = m.pow(2).sum() / n + 0.5 * reg * (W.pow(2).sum() + b.pow(2).sum())
                G = m.mul_(Y).mul_(-2.0 / n)
                return value, (G.t() @ Xd).t().contiguous() + reg * W, G.sum(0) + reg * b
            logp = F.log_softmax(z, dim=1)
            value = -logp.gather(1, yd[:, None]).sum() / n + 0.5 * reg * W.pow(2).sum()
            G = logp.exp_().sub_((Y + 1) / 2).div_(n)
            return value, (G.t() @ Xd).t().contiguous() + reg * W, G.sum(0)

        opt = torch.optim.LBFGS(
            [W, b],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            with torch.no_grad():
                value, gW, gb = objective_and_grad()
            W.grad, b.grad = gW, gb
            return value

        opt.step(closure)
        state = opt.state[W]
        self.n_iter_ = int(state.get("n_iter", 0))
        self.coef_ = W.detach().t().contiguous().cpu()
        self.intercept_ = b.detach().cpu()
        self.mean_ = mean.cpu()
        self.scale_ = scale.cpu()
        self.n_features_in_ = d
        self.n_classes_ = K
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    # -- inference --------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if getattr(self, "coef_", None) is None:
            raise NotFittedError(
                "This LinearGate instance is not fitted yet. Call 'fit' with appropriate arguments before using this estimator."
            )

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``(K, D)`` and bias ``(K,)`` on raw features (standardisation folded in)."""
        self._check_fitted()
        W = self.coef_ / self.scale_
        return W, self.intercept_ - W @ self.mean_

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Gate outputs ``(N, K)``: signed distances (hinge) or logits (ce)."""
        W, b = self.folded()
        return torch.addmm(b, X.float().cpu(), W.t())

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.decision_function(X).argmax(1)

    def score(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy on ``(X, y)``."""
        return float((self.predict(X) == y.cpu()).float().mean())


@dataclass(frozen=True)
class CSearch(AsDict):
    """The outcome of choosing C on a held-out part of the training data."""

    C: float
    grid: tuple[float, ...]
    holdout_accuracy: tuple[float, ...]


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)`` into (fit, held-out) indices."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, int(round(n * fraction)))
    return perm[k:], perm[:k]


def choose_C(
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str = "hinge",
    grid: tuple[float, ...] = DEFAULT_C_GRID,
    holdout: float = 0.1,
    num_classes: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> CSearch:
    """Choose C by accuracy on a held-out fraction of the training data (warm-started path).

    Example:
        >>> X = torch.randn(300, 4); y = (X[:, 0] + 0.1 * torch.randn(300) > 0).long()
        >>> choose_C(X, y, grid=(0.01, 1.0)).C in (0.01, 1.0)
        True
    """
    fit_idx, held_idx = holdout_split(X.shape[0], holdout, seed)
    accs = []
    prev: LinearGate | None = None
    for C in sorted(grid):
        gate = LinearGate(loss=loss, C=C, device=device).fit(X[fit_idx], y[fit_idx], num_classes=num_classes, init=prev)
        accs.append(gate.score(X[held_idx], y[held_idx]))
        prev = gate
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # ties: the stronger regularisation
    return CSearch(C=sorted(grid)[best], grid=tuple(sorted(grid)), holdout_accuracy=tuple(accs))
