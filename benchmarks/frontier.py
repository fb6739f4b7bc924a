"""The accuracy / cost frontier on real data: dgate's defaults against the paper's recipe and confidence exits.

Protocol (issue 5): gates are fitted on ``train``, thresholds calibrated on ``val`` with ``--max-drop``
at each drop level, and everything is reported on ``test``, which chooses nothing. Costs are MACs
per image and include the gates. Methods, all on the same frozen backbone and feature cache:

- ``paper``: d-gates as in the paper: hinge one-vs-all gates after stages 1 and 2 on globally
  average-pooled features (the mean of the cached 4x4 grid), exit on the largest distance,
  thresholds that meet the target on ``val`` exactly (``--reserve 0``).
- ``ce-softmax`` / ``ce-entropy``: the same positions and features as dgate's default, gates
  trained with cross-entropy, exit on max softmax probability / low entropy (BranchyNet,
  Shallow-Deep Networks). Calibrated like dgate's default (same noise reserve), so only the gates
  and the exit rule differ.
- ``dgate``: the run's own gates from ``dgate fit`` with every default (hinge, margin rule,
  ``--reserve 2``): exactly what ``dgate calibrate RUN --max-drop D`` chooses.
- ``dgate-z0``: the same gates calibrated without the noise reserve (what the search alone gives).
- ``dgate-c95``: the same gates with ``--confidence 0.95``.
- ``oracle``: every sample leaves at the first of dgate's gates that agrees with the backbone's
  prediction: the backbone's accuracy at the lowest cost these gates allow.

``--repeats R`` also measures calibration on unseen data without touching ``test``: R random
halves of ``val``; calibrate on one half, measure on the other.

Usage (after ``dgate extract`` with --train/--val/--test and ``dgate fit`` on each run):
    python benchmarks/frontier.py runs/r20 runs/r56 --plot benchmarks/frontier.png --repeats 20
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import emit

from dgate_cli import cache
from dgate_cli.errors import TargetUnreachableError
from dgate_cli.gates.linear import DEFAULT_C_GRID, LinearGate, choose_C
from dgate_cli.gates.scores import gate_scores
from dgate_cli.models.flops import gate_macs
from dgate_cli.pipeline.calibrate import DEFAULT_RESERVE, outcomes, reach_costs
from dgate_cli.pipeline.fit import read_gates
from dgate_cli.thresholds.guarantees import search_confident, search_reserved
from dgate_cli.thresholds.outcomes import GateOutcomes, OperatingPoint, subset
from dgate_cli.thresholds.search import lagrangian_path, search

DROPS = (0.002, 0.005, 0.01, 0.02)
PLOT_DROPS = (0.0, 0.03)
CURVE_DROPS = (-0.01, -0.005, 0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04)
PAPER_GATES = ("layer1", "layer2")


@dataclass
class Method:
    name: str
    val: GateOutcomes
    test: GateOutcomes
    reserve: float = DEFAULT_RESERVE
    confidence: float | None = None

    def calibrate(self, oc: GateOutcomes, drop: float) -> OperatingPoint | None:
        try:
            if self.confidence is not None:
                return search_confident(oc, self.confidence, max_drop=drop)
            return search_reserved(oc, oc.backbone_accuracy - drop, self.reserve, _path=_path(oc))
        except TargetUnreachableError:
            return None


_PATHS: dict[int, tuple[GateOutcomes, list[torch.Tensor]]] = {}


def _path(oc: GateOutcomes) -> list[torch.Tensor]:
    """The search's Lagrangian path, once per set of outcomes (it is the slow part of a search)."""
    if id(oc) not in _PATHS:
        _PATHS[id(oc)] = (oc, lagrangian_path(oc))
    return _PATHS[id(oc)][1]


def _outcomes(out: dict[str, torch.Tensor], split: cache.SplitFeatures, names, score, reach, gcost) -> GateOutcomes:
    scores, correct = [], []
    for n in names:
        s, p = gate_scores(out[n], score)
        scores.append(s)
        correct.append(p == split.labels)
    return GateOutcomes(
        torch.stack(scores, 1), torch.stack(correct, 1), split.logits.argmax(1) == split.labels, reach, gcost
    )


def _global_avg(config: cache.RunConfig, name: str, X: torch.Tensor) -> torch.Tensor:
    """Global average pooling recovered from cached NxCx4x4 (or 2x2) average grids."""
    i = config.gates.index(name)
    c = config.stage_shapes[i][0]
    cells = X.shape[1] // c
    if config.layouts[i] != "nchw" or X.shape[1] != c * cells or math.isqrt(cells) ** 2 != cells:
        sys.exit(f"{name}: the cache does not hold an average grid of {c} channels; extract with default pooling")
    return X.view(X.shape[0], c, cells).mean(2)


def _fit_outputs(run: Path, tag: str, loss: str, names, view, splits, K: int) -> dict[str, dict[str, torch.Tensor]]:
    """Gate outputs on val and test for gates fitted on train like ``dgate fit`` does (cached in RUN/frontier;
    delete that folder after a new ``dgate extract``)."""
    from safetensors.torch import load_file, save_file

    path = run / "frontier" / f"{tag}.safetensors"
    if path.exists():
        flat = load_file(str(path))
    else:
        train = cache.load_split(run, "train")  # only when fitting: it is the largest split
        flat = {}
        for n in names:
            t0 = time.perf_counter()
            X = view(n, train.features[n].float())
            C = choose_C(X, train.labels, loss=loss, grid=DEFAULT_C_GRID, holdout=0.1, num_classes=K).C
            gate = LinearGate(loss=loss, C=C, max_iter=500).fit(X, train.labels, num_classes=K)
            flat[f"{n}.weight"], flat[f"{n}.bias"] = gate.folded()
            print(f"  {run.name} {tag} {n}: C={C:g} {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        path.parent.mkdir(exist_ok=True)
        save_file(flat, str(path))
    return {
        s: {
            n: torch.addmm(flat[f"{n}.bias"], view(n, splits[s].features[n].float()), flat[f"{n}.weight"].t())
            for n in names
        }
        for s in ("val", "test")
    }


def methods_for(run: Path) -> tuple[list[Method], GateOutcomes, torch.Tensor, cache.RunConfig]:
    """The methods, dgate's test outcomes, and whether each of its gates agrees with the backbone on test."""
    config = cache.read_run(run)
    splits = {s: cache.load_split(run, s) for s in ("val", "test")}
    names = list(config.gates)
    fitted = read_gates(run)
    if fitted.loss != "hinge":
        sys.exit(f"{run}: fit the run with `dgate fit {run}` (hinge, the default) first")
    dg, preds = {}, {}
    for s in ("val", "test"):
        dg[s], preds[s] = outcomes(config, fitted, splits[s], names, fitted.score)
    agree = preds["test"] == splits["test"].logits.argmax(1)[:, None]
    reach, gcost = dg["val"].reach_costs, dg["val"].gate_costs

    def same(_n, X):
        return X

    K = config.num_classes
    ce = _fit_outputs(run, "ce", "ce", names, same, splits, K)
    missing = [n for n in PAPER_GATES if n not in names]
    if missing:
        sys.exit(f"{run}: the cache lacks the paper's positions {missing}")
    pidx = [names.index(n) for n in PAPER_GATES]
    p_reach = reach_costs(config, list(PAPER_GATES))
    p_cost = torch.tensor(
        [gate_macs(math.prod(config.stage_shapes[i]), config.stage_shapes[i][0], K) for i in pidx],
        dtype=torch.float64,
    )

    def gavg(n, X):
        return _global_avg(config, n, X)

    paper = _fit_outputs(run, "paper", "hinge", PAPER_GATES, gavg, splits, K)
    ms = [
        Method(
            "paper",
            *(_outcomes(paper[s], splits[s], PAPER_GATES, "max", p_reach, p_cost) for s in ("val", "test")),
            0.0,
        ),
        Method("ce-softmax", *(_outcomes(ce[s], splits[s], names, "softmax", reach, gcost) for s in ("val", "test"))),
        Method("ce-entropy", *(_outcomes(ce[s], splits[s], names, "entropy", reach, gcost) for s in ("val", "test"))),
        Method("dgate", dg["val"], dg["test"]),
        Method("dgate-z0", dg["val"], dg["test"], 0.0),
        Method("dgate-c95", dg["val"], dg["test"], confidence=0.95),
    ]
    return ms, dg["test"], agree, config


def oracle(oc: GateOutcomes, backbone_pred_agree: torch.Tensor) -> float:
    """Cost ratio if each sample left at the first gate agreeing with the backbone (gates passed included)."""
    n, g = backbone_pred_agree.shape
    first = torch.where(backbone_pred_agree.any(1), backbone_pred_agree.float().argmax(1), torch.full((n,), g))
    return float(oc.exit_costs()[first].mean() / oc.reach_costs[-1])


def run_one(
    run: Path, drops, repeats: int, seed: int, only: set[str] | None = None
) -> tuple[list[dict], list[dict], dict]:
    ms, dg_test, agree, config = methods_for(run)
    ms = [m for m in ms if only is None or m.name in only]
    rows, curves, equal = [], {}, []
    base = dg_test.backbone_accuracy
    model = config.model["spec"]
    for m in ms:
        if m.name in ("paper", "ce-softmax", "ce-entropy", "dgate"):
            equal.append({"model": model, "method": m.name, **_equal_accuracy(m, base, drops)})
        pts = []
        for d in sorted(set(drops) | set(PLOT_DROPS)):
            p = m.calibrate(m.val, d)
            if p is None:
                continue
            t = m.test.evaluate(p.thresholds)
            pts.append((t.cost_ratio, t.accuracy))
            if d in drops:
                rows.append(
                    {
                        "model": model,
                        "method": m.name,
                        "max_drop_pts": round(100 * d, 2),
                        "val_acc": round(100 * p.accuracy, 2),
                        "test_acc": round(100 * t.accuracy, 2),
                        "test_drop_pts": round(100 * (base - t.accuracy), 2),
                        "reduction_pct": round(100 * (1 - t.cost_ratio), 1),
                        "within": bool(base - t.accuracy <= d + 1e-9),
                    }
                )
        curves[f"{model} {m.name}"] = pts
    o = oracle(dg_test, agree)
    rows.append(
        {
            "model": model,
            "method": "oracle",
            "max_drop_pts": 0.0,
            "val_acc": None,
            "test_acc": round(100 * base, 2),
            "test_drop_pts": 0.0,
            "reduction_pct": round(100 * (1 - o), 1),
            "within": True,
        }
    )
    coverage = []
    if repeats:
        g = torch.Generator().manual_seed(seed)
        n = ms[0].val.num_samples
        checked = [m for m in ms if m.name in ("paper", "dgate", "dgate-c95")]
        stats = {(m.name, d): [] for m in checked for d in drops}
        for _ in range(repeats):
            perm = torch.randperm(n, generator=g)
            halves: dict[int, tuple[GateOutcomes, GateOutcomes]] = {}
            for m in checked:
                if id(m.val) not in halves:  # methods on the same gates share the halves (and their search path)
                    halves[id(m.val)] = (subset(m.val, perm[: n // 2]), subset(m.val, perm[n // 2 :]))
                a, b = halves[id(m.val)]
                for d in drops:
                    p = m.calibrate(a, d)
                    if p is not None:
                        stats[(m.name, d)].append(b.backbone_accuracy - b.evaluate(p.thresholds).accuracy)
            _PATHS.clear()
        for (name, d), realized in stats.items():
            coverage.append(
                {
                    "model": model,
                    "method": name,
                    "max_drop_pts": round(100 * d, 2),
                    "repeats": len(realized),
                    "mean_excess_drop_pts": round(100 * (sum(realized) / max(1, len(realized)) - d), 2),
                    "held_pct": round(100 * sum(r <= d + 1e-12 for r in realized) / max(1, len(realized))),
                }
            )
    return rows + equal, coverage, {"model": model, "curves": curves, "backbone": base}


def _equal_accuracy(m: Method, base: float, drops) -> dict:
    """Test reduction at equal test accuracy: the gates' trade-off curve, apart from calibration noise.

    Thresholds come from val (the plain search at many nominal drops); their test (drop, reduction)
    points are interpolated on their upper envelope at each drop. Descriptive only: test chooses
    nothing that is reported above.
    """
    pts = []
    for d in CURVE_DROPS:
        try:
            p = search(m.val, min(1.0, m.val.backbone_accuracy - d), polish=False, _path=_path(m.val))
        except TargetUnreachableError:
            continue
        t = m.test.evaluate(p.thresholds)
        pts.append((base - t.accuracy, 1 - t.cost_ratio))
    pts.sort()
    env, best = [], -1.0
    for x, y in pts:
        best = max(best, y)
        env.append((x, best))
    out = {}
    for d in drops:
        val = None
        for (x0, y0), (x1, y1) in zip(env, env[1:], strict=False):
            if x0 <= d <= x1:
                val = y0 + (y1 - y0) * (d - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
        if val is None and env and d >= env[-1][0]:
            val = env[-1][1]
        out[f"at_{100 * d:g}pt"] = None if val is None else round(100 * val, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (extracted with train/val/test, fitted)")
    ap.add_argument("--drops", default=",".join(str(d) for d in DROPS), help="accuracy drops (fractions)")
    ap.add_argument("--repeats", type=int, default=0, help="val half-splits for the coverage table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, help="write a PNG of test accuracy vs cost for every method")
    ap.add_argument("--methods", help="only these methods, e.g. dgate,dgate-c95 (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    drops = tuple(float(d) for d in args.drops.split(","))
    all_rows, all_cov, plots = [], [], []
    for run in args.runs:
        only = set(args.methods.split(",")) if args.methods else None
        rows, cov, plot = run_one(run, drops, args.repeats, args.seed, only)
        all_rows += rows
        all_cov += cov
        plots.append(plot)
    main_rows = [r for r in all_rows if "max_drop_pts" in r]
    equal_rows = [r for r in all_rows if "max_drop_pts" not in r]
    tables = {
        "frontier": (
            "test split; thresholds calibrated on val with --max-drop; costs in MACs, gates included",
            main_rows,
        ),
        "equal_accuracy": (
            "test MACs reduction (%) at equal test accuracy drop (points): each method's val-chosen curve on test",
            equal_rows,
        ),
    }
    if all_cov or args.json:
        title = f"calibration on unseen data: {args.repeats} random halves of val (calibrate / check)"
        tables["coverage"] = (title, all_cov)
    emit(tables, args.json)
    if args.plot:
        _plot(plots, args.plot)


def _plot(plots: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(6.5 * len(plots), 4.5), dpi=120, squeeze=False)
    for ax, p in zip(axes[0], plots, strict=True):
        for label, pts in p["curves"].items():
            if label.endswith(("-z0", "-c95")):
                continue
            pts = sorted(pts)
            ax.plot(
                [100 * c for c, _ in pts], [100 * a for _, a in pts], marker="o", markersize=3, label=label.split()[-1]
            )
        ax.axhline(100 * p["backbone"], color="grey", linestyle="--", linewidth=1, label="backbone")
        ax.set_title(f"{p['model']}: test accuracy vs cost (calibrated on val)")
        ax.set_xlabel("mean MACs per image (% of the backbone, gates included)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(100 * p["backbone"] - 4, 100 * p["backbone"] + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
