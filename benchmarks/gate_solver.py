"""The hinge gate solver against scikit-learn's LinearSVC, like for like.

Both solve the same problem: one-vs-all squared hinge with L2 regularisation, bias penalised
(liblinear's intercept_scaling=1), on standardised features, at the same C. Reported per case:
validation accuracy of both, agreement of their predictions, the ratio of their objectives, and
fit times (same machine, same run). Plus the timing of one gate on 50,000 x 4,096 features.

    python benchmarks/gate_solver.py --run runs/r56 --json
    python benchmarks/gate_solver.py --synthetic-only
    python benchmarks/gate_solver.py --run runs/r20 --gates layer1 --synthetic 0
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _common import emit

from dgate_cli.cache.run import read_run
from dgate_cli.cache.shards import load_split
from dgate_cli.gates.linear import LinearGate


def objective(W: torch.Tensor, b: torch.Tensor, Xs: torch.Tensor, y: torch.Tensor, C: float) -> float:
    Y = -torch.ones(len(y), W.shape[0], dtype=torch.float64)
    Y[torch.arange(len(y)), y] = 1
    m = (1 - Y * (Xs @ W.double().T + b.double())).clamp_min(0)
    return float(0.5 * (W.double().pow(2).sum() + b.double().pow(2).sum()) + C * m.pow(2).sum())


def compare(name: str, X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, C: float, K: int) -> dict:
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    t0 = time.perf_counter()
    gate = LinearGate(loss="hinge", C=C).fit(X, y, num_classes=K)
    t_ours = time.perf_counter() - t0
    sc = StandardScaler().fit(X.numpy())
    Xs = torch.tensor(sc.transform(X.numpy()), dtype=torch.float64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svc = LinearSVC(loss="squared_hinge", dual=False, C=C, tol=1e-5, max_iter=10000).fit(Xs.numpy(), y.numpy())
    t_sk = time.perf_counter() - t0
    pv_ours = gate.predict(Xv)
    pv_sk = torch.tensor(svc.predict(sc.transform(Xv.numpy())))
    o_ours = objective(gate.coef_, gate.intercept_, Xs, y, C)
    o_sk = objective(torch.tensor(svc.coef_), torch.tensor(svc.intercept_), Xs, y, C)
    return {
        "case": name,
        "n": X.shape[0],
        "d": X.shape[1],
        "C": C,
        "acc_dgate": round(float((pv_ours == yv).float().mean()), 4),
        "acc_sklearn": round(float((pv_sk == yv).float().mean()), 4),
        "agreement": round(float((pv_ours == pv_sk).float().mean()), 4),
        "objective_ratio": round(o_ours / o_sk, 6),
        "s_dgate": round(t_ours, 2),
        "s_sklearn": round(t_sk, 2),
        "speedup": round(t_sk / t_ours, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run directory from `dgate extract` (its train and val splits)")
    ap.add_argument("--gates", help="only these gates of the run, e.g. layer1,layer3.5 (default: all)")
    ap.add_argument("--C", type=float, default=0.01)
    ap.add_argument("--synthetic", default="50000x4096", help="N x D of the synthetic timing case (0: none)")
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    if a.run and not a.synthetic_only:
        cfg = read_run(a.run)
        for g in a.gates.split(",") if a.gates else cfg.gates:
            tr, va = load_split(a.run, "train", gates=[g]), load_split(a.run, "val", gates=[g])
            rows.append(
                compare(
                    f"{g} ({cfg.model['spec']})",
                    tr.features[g],
                    tr.labels,
                    va.features[g],
                    va.labels,
                    a.C,
                    cfg.num_classes,
                )
            )
    if a.synthetic != "0":
        n, d = (int(v) for v in a.synthetic.lower().split("x"))
        rows.append(synthetic(n, d, a.C))
    title = f"hinge gate solver vs sklearn LinearSVC(squared_hinge), {torch.get_num_threads()} threads"
    emit({"cases": (title, rows)}, a.json, {"threads": torch.get_num_threads()} if a.json else None)


def synthetic(n: int, d: int, C: float, K: int = 10) -> dict:
    """One gate on ``n x d`` features (``K`` classes, a linear signal in noise), ours only."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, K, generator=g) / d**0.5
    X = torch.randn(n, d, generator=g)
    y = (X @ W + 0.5 * torch.randn(n, K, generator=g)).argmax(1)
    t0 = time.perf_counter()
    gate = LinearGate(loss="hinge", C=C, max_iter=500).fit(X, y, num_classes=K)
    return {
        "case": f"synthetic {n} x {d}, dgate only",
        "n": n,
        "d": d,
        "C": C,
        "acc_dgate": round(gate.score(X, y), 4),
        "s_dgate": round(time.perf_counter() - t0, 2),
        "iterations": gate.n_iter_,
    }


if __name__ == "__main__":
    main()
