"""The accuracy / cost frontier of cascades against the last member gated alone, on real data.

Protocol: the members' gates are fitted on ``train``; exit policies (learned variants) are fitted on
``val`` by cross-fitting; thresholds are calibrated on ``val`` as ``dgate calibrate`` does (noise
reserve of 2 standard deviations) at each accuracy level, against the last member alone (the
reference); everything is reported on ``test``, which chooses nothing. Costs are MACs as fractions
of the reference's, and include every member run, every open exit, each member's input
normalisation and, for learned policies, their features.

Rows (``variant``):

- ``gated``: the last member alone with its own gates (``dgate calibrate`` on its run directory).
- ``cascade``: the members chained; ``answers`` ``own`` (each member answers alone) or
  ``combined`` (later members average their probabilities with the earlier members');
  ``gates`` ``in`` (members' gates are exits too) or ``ends`` (exits only at members' answers);
  ``policy`` ``threshold`` (each exit's rule) or ``learned`` (Bolukbasi-style policies; at each
  level the trade-off lambda whose cross-fitted val cost is lowest).
- ``oracle``: each image leaves at the first exit (of the richest cascade) that is right, or at the
  first exit if none is: the most accurate and cheapest any exit rule could be.

Levels: ``drop_pts`` is the accuracy drop allowed below the reference's on val (negative: a gain
asked for). ``best <= 0.65``: the most accurate val point whose val cost is at most 0.65.
A second table gives test cost at equal test accuracy (interpolated between val-chosen points:
descriptive, test chooses nothing reported in the first).

Usage (members extracted with --train/--val/--test and fitted):
    python benchmarks/cascade_frontier.py runs/r20 runs/r56 --plot benchmarks/cascade_frontier.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from _common import emit

from dgate_cli.errors import TargetUnreachableError
from dgate_cli.gates.policy import DEFAULT_LAMBDAS, cross_fit_scores
from dgate_cli.pipeline.calibrate import DEFAULT_RESERVE, outcomes
from dgate_cli.pipeline.cascade import Member, read_member
from dgate_cli.pipeline.exits import ExitTable, load_outputs, table
from dgate_cli.pipeline.policies import network_member
from dgate_cli.thresholds.guarantees import search_reserved
from dgate_cli.thresholds.outcomes import GateOutcomes, OperatingPoint
from dgate_cli.thresholds.search import lagrangian_path, search

DROPS = (-0.01, -0.005, 0.0, 0.002, 0.005, 0.01, 0.02)
GAINS = (-0.03, -0.02, -0.015)  # more levels for the best point within the budget
CURVE = tuple(d / 1000 for d in range(-30, 41, 5))  # nominal drops for the equal-accuracy table
EQUAL_AT = (0.846, 0.8338, 0.832, 0.8288, 0.8238, 0.8138)  # test accuracies to compare costs at
BUDGET = 0.65


def members(runs: list[Path]) -> list[Member]:
    for p in runs:
        read_member(p)  # the same checks as `dgate cascade`
    return [network_member(p) for p in runs]


class Variant:
    """One row: val and test outcomes per lambda (threshold variants: one, ``None``)."""

    def __init__(self, name: dict, val: dict, test: dict):
        self.name, self.val, self.test = name, val, test
        self._paths: dict = {}
        self._at: dict = {}

    def at(self, goal: float) -> tuple[OperatingPoint, GateOutcomes] | None:
        """The cheapest val point (over lambdas) reaching ``goal`` with the reserve, and its test outcomes."""
        if goal not in self._at:
            self._at[goal] = self._search(goal)
        return self._at[goal]

    def _search(self, goal: float) -> tuple[OperatingPoint, GateOutcomes] | None:
        best = None
        for lam, oc in self.val.items():
            path = self._paths.setdefault(lam, lagrangian_path(oc))
            try:
                p = search_reserved(oc, goal, DEFAULT_RESERVE, _path=path)
            except TargetUnreachableError:
                continue
            if best is None or p.mean_cost < best[0].mean_cost:
                best = (p, self.test[lam])
        return best

    def plain(self, goal: float) -> list[tuple[OperatingPoint, GateOutcomes]]:
        out = []
        for lam, oc in self.val.items():
            try:
                out.append(
                    (
                        search(oc, goal, polish=False, _path=self._paths.setdefault(lam, lagrangian_path(oc))),
                        self.test[lam],
                    )
                )
            except TargetUnreachableError:
                continue
        return out


def _learned(val: ExitTable, test: ExitTable, lam: float, folds: int) -> tuple[GateOutcomes, GateOutcomes]:
    """Cross-fitted val scores, and test scores of the policies fitted on all of val."""
    from dgate_cli.gates.policy import fit_policies

    feats = [val.features(g) for g in range(len(val.exits))]
    correct = val.outcomes().all_correct()
    costs = val.exit_costs()
    oof = cross_fit_scores(feats, correct, costs, lam, folds=folds)
    pols = fit_policies(feats, correct, costs, lam)
    test_scores = torch.stack([p.score(test.features(g)) for g, p in enumerate(pols)], 1)
    return val.outcomes(oof), test.outcomes(test_scores)


def variants(runs: list[Path], lambdas, folds: int, learned: bool) -> list[Variant]:
    ms = members(runs)
    ref = ms[-1]
    out_val, out_test = load_outputs(ms, "val"), load_outputs(ms, "test")
    rows = []
    fitted = ref.fitted
    val_oc = outcomes(ref.config, fitted, _split(ref, "val"), ref.gates, fitted.score)[0]
    test_oc = outcomes(ref.config, fitted, _split(ref, "test"), ref.gates, fitted.score)[0]
    rows.append(
        Variant(
            {"variant": "gated", "answers": "-", "gates": "in", "policy": "threshold"}, {None: val_oc}, {None: test_oc}
        )
    )
    for gates in ("in", "ends"):
        mm = ms if gates == "in" else [dataclasses.replace(m, gates=[]) for m in ms]
        ov = out_val if gates == "in" else load_outputs(mm, "val")
        ot = out_test if gates == "in" else load_outputs(mm, "test")
        for answers in ("own", "combined"):
            ens = (False,) + (answers == "combined",) * (len(ms) - 1)
            tv, tt = table(mm, ov, ens), table(mm, ot, ens)
            name = {"variant": "cascade", "answers": answers, "gates": gates}
            rows.append(Variant({**name, "policy": "threshold"}, {None: tv.outcomes()}, {None: tt.outcomes()}))
            if learned:
                pairs = {lam: _learned(tv, tt, lam, folds) for lam in lambdas}
                rows.append(
                    Variant(
                        {**name, "policy": "learned"},
                        {k: v[0] for k, v in pairs.items()},
                        {k: v[1] for k, v in pairs.items()},
                    )
                )
    return rows


def _split(m: Member, split: str):
    from dgate_cli import cache

    return cache.load_split(m.run_dir, split, gates=m.gates)


def oracle(v: Variant) -> tuple[float, float]:
    oc = v.test[None]
    right = oc.all_correct()
    first = torch.where(right.any(1), right.to(torch.int8).argmax(1), torch.zeros(oc.num_samples, dtype=torch.long))
    acc = float(right.any(1).double().mean())
    return acc, float(oc.exit_costs()[first].mean() / oc.backbone_cost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="member run directories, cheapest first (extracted, fitted)")
    ap.add_argument("--lambdas", default="0.1,0.3,1", help=f"trade-offs to try (dgate fit: {DEFAULT_LAMBDAS})")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--no-learned", action="store_true", help="skip the learned-policy rows")
    ap.add_argument("--plot", type=Path, help="write a PNG of test accuracy vs cost for every row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if len(args.runs) < 2:
        sys.exit("give two or more member run directories, cheapest first")
    t0 = time.perf_counter()
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rows = variants(args.runs, lambdas, args.folds, not args.no_learned)
    ref_val = rows[0].val[None].backbone_accuracy
    ref_test = rows[0].test[None].backbone_accuracy
    table_rows, equal_rows, curves = [], [], {}
    for v in rows:
        row = dict(v.name)
        for d in DROPS:
            got = v.at(ref_val - d)
            key = f"{100 * d:+g}pt"
            if got is None:
                row[key] = "unreachable"
                continue
            p, test = got
            t = test.evaluate(p.thresholds)
            row[key] = f"{100 * t.accuracy:.2f}% @ {t.cost_ratio:.3f}"
        best = None
        for d in (*GAINS, *DROPS):
            got = v.at(ref_val - d)
            if got is not None and got[0].cost_ratio <= BUDGET and (best is None or got[0].accuracy > best[0].accuracy):
                best = got
        if best is not None:
            t = best[1].evaluate(best[0].thresholds)
            row[f"best<={BUDGET}"] = f"{100 * t.accuracy:.2f}% @ {t.cost_ratio:.3f}"
        table_rows.append(row)
        pts = sorted(
            {
                (round(t.cost_ratio, 5), round(t.accuracy, 5))
                for d in CURVE
                for p, oc in v.plain(ref_val - d)
                for t in [oc.evaluate(p.thresholds)]
            }
        )
        curves[" ".join(str(x) for x in v.name.values())] = pts
        erow = dict(v.name)
        for a in EQUAL_AT:
            costs = [c for c, acc in pts if acc >= a]
            erow[f"{100 * a:.2f}%"] = None if not costs else round(min(costs), 3)
        equal_rows.append(erow)
    acc, cost = oracle(rows[1])
    table_rows.append(
        {"variant": "oracle", "answers": "own", "gates": "in", "policy": "-", "+0pt": f"{100 * acc:.2f}% @ {cost:.3f}"}
    )
    if args.plot:
        _plot(curves, args.plot, ref_test)
    emit(
        {
            "frontier": (
                f"test accuracy @ cost (fraction of {args.runs[-1].name}'s MACs) at each allowed val drop; reference {100 * ref_test:.2f}% on test, {100 * ref_val:.2f}% on val",
                table_rows,
            ),
            "equal": ("lowest test cost among val-chosen points reaching each test accuracy (descriptive)", equal_rows),
        },
        args.json,
        {
            "reference_test_accuracy": ref_test,
            "reference_val_accuracy": ref_val,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )


def _plot(curves: dict, path: Path, ref: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pts in curves.items():
        if pts:
            front, best = [], -1.0
            for c, a in sorted(pts):
                if a > best:
                    front.append((c, a))
                    best = a
            ax.plot([c for c, _ in front], [100 * a for _, a in front], marker=".", label=name)
    ax.axhline(100 * ref, color="grey", linestyle=":", label="reference (last member alone)")
    ax.set_xlabel("cost (fraction of the reference's MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 1.4)
    ax.set_ylim(100 * ref - 8, 100 * ref + 2.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
