"""``dgate fit``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..gates.linear import DEFAULT_C_GRID
from ..pipeline.cascade import is_cascade
from ..pipeline.fit import fit
from ..pipeline.policies import fit_exit_policies
from . import _options as o
from ._output import note, out, pct, print_json, progress
from .cascade import render_policy_fit


def fit_command(
    run_dir: o.RunDir,
    loss: Annotated[
        str,
        typer.Option(help="hinge: one-vs-all squared hinge (the d-gate, signed distances); ce: softmax cross-entropy."),
    ] = "hinge",
    C: Annotated[
        float | None,
        typer.Option(
            "--C",
            "-C",
            help="Inverse regularisation strength; default: chosen per gate on a held-out part of train.",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        str, typer.Option(help="Fit gates to the 'label' (the paper) or to the 'backbone' prediction.")
    ] = "label",
    holdout: Annotated[float, typer.Option(help="Fraction of train held out to choose C.")] = 0.1,
    device: o.Device = "auto",
    max_iter: Annotated[int, typer.Option(help="L-BFGS iterations at most per fit.", min=1)] = 500,
    policies: Annotated[
        bool,
        typer.Option(
            help="Also fit learned exit policies (Bolukbasi et al. 2017) on the val split, cross-fitted; "
            "`dgate calibrate` then keeps them where they are cheaper than the gates' own scores."
        ),
    ] = False,
    policies_only: Annotated[
        bool, typer.Option(help="Fit only the learned exit policies, on the gates already fitted (no refit).")
    ] = False,
    json: o.Json = False,
) -> None:
    """Fit one linear gate per cached position on the train split (backbone frozen).

    Each gate is one linear layer on the pooled stage features. With --loss hinge it is K one-vs-all
    linear SVMs (squared hinge, L2), so its outputs are signed distances to each class boundary.
    Features are standardised; the standardisation is folded into the weights.

    On a cascade run directory (`dgate cascade`) it fits learned exit policies instead, on the val
    split with cross-fitting (the members' gates are already fitted).

    Example: dgate fit runs/r56
    """
    if is_cascade(run_dir) or policies_only:
        with progress(enabled=not json, unit="variants") as bar:
            fitted = fit_exit_policies(run_dir, progress=bar)
        if json:
            print_json(fitted.to_dict())
        else:
            render_policy_fit(fitted)
        return
    grid = ", ".join(f"{c:g}" for c in DEFAULT_C_GRID)
    with progress(enabled=not json, unit="gates") as bar:
        result = fit(
            run_dir, loss=loss, C=C, target=target, holdout=holdout, device=device, max_iter=max_iter, progress=bar
        )
    learned = None
    if policies:
        with progress(enabled=not json, unit="variants") as bar:
            learned = fit_exit_policies(run_dir, progress=bar)
    if json:
        print_json({**result.to_dict(), **({"policies": learned.to_dict()} if learned else {})})
        return
    for n in result.notes:
        note(n)
    table = Table(title=f"dgate fit: {result.loss} gates on {run_dir} (targets: {result.target})", title_justify="left")
    for col in ("gate", "features", "C", "train acc", "val acc", "agrees w/ backbone", "fit time"):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for g in result.gates:
        table.add_row(
            g.gate,
            str(g.features),
            f"{g.C:g}",
            pct(g.train_accuracy),
            pct(g.val_accuracy),
            pct(g.agreement),
            f"{g.seconds:.1f} s",
        )
    out.print(table)
    if C is None:
        out.print(f"C chosen per gate from {{{grid}}} by accuracy on {holdout:.0%} of train held out")
    if learned is not None:
        render_policy_fit(learned, next_step=False)
    out.print(f"next: dgate calibrate {run_dir} --max-drop 0.01")
