"""``dgate calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..evaluation.plot import check_plot_path, plot_frontiers
from ..models.flops import human
from ..pipeline.calibrate import CalibrationResult, calibrate
from . import _options as o
from ._output import out, pct, print_json, warn
from .cascade import render_variants


def calibrate_command(
    run_dir: o.RunDir,
    target_acc: Annotated[
        float | None, typer.Option(help="Accuracy to reach on the calibration split, e.g. 0.93.", show_default=False)
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="Or: the largest accuracy drop below the backbone's, e.g. 0.01 for one point.", show_default=False
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Calibration split (never the one you report on).")] = "val",
    score: Annotated[
        str | None,
        typer.Option(
            help="Exit rule: max (largest distance), margin, softmax or entropy. Default: margin (largest minus second largest distance) for hinge gates, softmax for ce.",
            show_default=False,
        ),
    ] = None,
    gates: o.Gates = None,
    reserve: Annotated[
        float,
        typer.Option(
            help="Standard deviations of calibration noise to keep in reserve so the target holds on new data "
            "in expectation; 0 fits the calibration split exactly (the paper's rule).",
            min=0.0,
        ),
    ] = 2.0,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="Make the target hold on new data with this probability (e.g. 0.95): thresholds learnt on half the calibration split, tested with binomial bounds on the other half.",
            show_default=False,
        ),
    ] = None,
    gate_overhead: Annotated[
        float,
        typer.Option(
            help="Charge each open gate this fraction of the backbone's cost, for the fixed time a gate takes "
            "beyond its MACs, so that gates which save less stay closed. About 0.01 for a CIFAR ResNet on a CPU; "
            "0 counts MACs only (the paper's cost).",
            min=0.0,
            max=0.99,
        ),
    ] = 0.0,
    policy: Annotated[
        str,
        typer.Option(
            help="Exit on each exit's rule ('threshold'), on the policies `dgate fit` learned ('learned': cascades, or `dgate fit --policies`), or the cheaper at the target ('auto')."
        ),
    ] = "auto",
    ensemble: Annotated[
        str,
        typer.Option(
            help="Cascades: later members answer alone ('off'), with the average of the members' probabilities so far ('on'), or whichever is cheaper ('auto')."
        ),
    ] = "auto",
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw the accuracy/cost frontier to this PNG (needs matplotlib).", show_default=False),
    ] = None,
    json: o.Json = False,
) -> None:
    """Choose gate thresholds with the lowest mean cost that reach the target accuracy.

    A sample leaves at the first gate whose score reaches its threshold. The cost of a sample is
    the backbone's MACs up to where it leaves plus every gate it passed; the search is exact
    one gate at a time and joint across gates (never worse than the paper's sequential rule).

    Example: dgate calibrate runs/r56 --max-drop 0.01   or   dgate calibrate runs/r56 --target-acc 0.93
    """
    if plot is not None:
        check_plot_path(plot)  # before the work, not after it
    result = calibrate(
        run_dir,
        target_acc=target_acc,
        max_drop=max_drop,
        split=split,
        score=score,
        gates=o.split_list(gates),
        confidence=confidence,
        reserve=reserve,
        gate_overhead=gate_overhead,
        policy=policy,
        ensemble=ensemble,
    )
    if plot is not None:
        plot_frontiers(
            {f"d-gates ({result.score})": [(p.cost_ratio, p.accuracy) for p in result.frontier.points]},
            plot,
            title=f"{run_dir}: accuracy vs cost on {result.split}",
            baseline=result.backbone_accuracy,
            marks={"chosen": (result.chosen.cost_ratio, result.chosen.accuracy)},
        )
    if json:
        print_json(result.to_dict())
        return
    for w in result.warnings:
        warn(w)
    render(result)
    if plot is not None:
        out.print(f"frontier plot: {plot}")


def render(r: CalibrationResult) -> None:
    exits = [*r.gates, "end"]
    shares = _per_member if r.cascade is not None else None
    if r.cascade is not None:
        exits = list(r.cascade["members"])
    table = Table(
        title=f"accuracy / cost frontier on '{r.split}' ({r.num_samples:,} images, backbone {pct(r.backbone_accuracy)})",
        title_justify="left",
    )
    for col in (
        "promises",
        f"on {r.split}",
        "vs backbone",
        f"mean {r.unit}",
        "cost ratio",
        "reduction",
        "exits " + " / ".join(exits),
    ):
        table.add_column(col, justify="right")
    for p in r.frontier.points:
        table.add_row(
            pct(p.target if p.target is not None else p.accuracy),
            pct(p.accuracy),
            f"{100 * (p.accuracy - r.backbone_accuracy):+.2f} pt",
            human(p.mean_cost),
            f"{p.cost_ratio:.3f}",
            pct(1 - p.cost_ratio, 1),
            " / ".join(f"{100 * f:.0f}%" for f in (shares(r, p.exit_fractions) if shares else p.exit_fractions)),
        )
    out.print(table)
    c = r.chosen
    chosen = Table(title=f"chosen thresholds (target accuracy {pct(r.target_accuracy)})", title_justify="left")
    for col in ("exit", "threshold", "exits here", f"cost here ({r.unit})"):
        chosen.add_column(col, justify="left" if col == "exit" else "right")
    spent = 0.0
    for g, name in enumerate(r.gates):
        t = c.thresholds[g]
        if t != float("inf"):
            spent += r.gate_costs[g]
        chosen.add_row(
            name,
            "closed" if t == float("inf") else f"{t:.4f}",
            pct(c.exit_fractions[g], 1),
            human(r.reach_costs[g] + spent),
        )
    chosen.add_row("end", "-", pct(c.exit_fractions[-1], 1), human(r.reach_costs[-1] + spent))
    out.print(chosen)
    if r.cascade is not None:
        render_variants(r)
    elif r.policy is not None:
        tried = ", ".join(_variant(v) for v in r.policy["variants"])
        out.print(f"exit policies at the target (cost ratio): {tried}; chosen: {r.policy['policy']}")
    if r.target.get("reserve"):
        out.print(
            f"'promises': the accuracy each point should keep on new data; on {r.split} it keeps "
            f"{r.target['reserve']:g} standard deviations of the discordant-sample noise above it (--reserve)"
        )
    if r.target.get("gate_overhead"):
        closed = sum(t == float("inf") for t in c.thresholds)
        out.print(
            f"each open gate was charged {pct(r.target['gate_overhead'], 1)} of the backbone's cost (--gate-overhead): "
            f"{closed} of {len(r.gates)} gates closed; costs shown are MACs"
        )
    out.print(
        f"calibrated accuracy {pct(c.accuracy)} (backbone {pct(r.backbone_accuracy)}), mean cost {human(c.mean_cost)}{r.unit} "
        f"= {c.cost_ratio:.3f} x backbone: predicted reduction [bold]{pct(1 - c.cost_ratio, 1)}[/] "
        f"(paper's sequential thresholds: {pct(1 - r.sequential.cost_ratio, 1)})"
    )
    out.print(f"next: dgate export {r.run_dir} --out DIR")


def _variant(v: dict) -> str:
    name = v["policy"] if v["lambda"] is None else f"{v['policy']} (lambda {v['lambda']:g})"
    return f"{name} {'unreachable' if v['cost_ratio'] is None else format(v['cost_ratio'], '.3f')}"


def _per_member(r: CalibrationResult, fractions: tuple[float, ...]) -> list[float]:
    """A cascade's exit fractions summed per member (the end belongs to the last)."""
    info = r.cascade or {}
    owner = [e["member"] for e in info["exits"]] + [len(info["members"]) - 1]
    return [sum(f for f, k in zip(fractions, owner, strict=True) if k == m) for m in range(len(info["members"]))]
