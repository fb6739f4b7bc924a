"""``dgate cascade``, and what ``fit`` and ``calibrate`` show for a cascade."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..pipeline.calibrate import CalibrationResult
from ..pipeline.cascade import create
from ..pipeline.policies import PolicyFit
from . import _options as o
from ._output import out, print_json


def cascade_command(
    out_run: Annotated[Path, typer.Argument(help="The cascade's new run directory.", show_default=False)],
    members: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more extracted and fitted run directories, cheapest first; the last is the reference.",
            show_default=False,
        ),
    ],
    member_gates: Annotated[
        bool,
        typer.Option(help="Use each member's fitted gates as exits inside it (else: exits only at members' ends)."),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace a cascade already in OUT_RUN.")] = False,
    json: o.Json = False,
) -> None:
    """Chain pretrained networks into a cascade: a cheap one answers the easy images, the next runs
    (from the image) only for the others. Then fit, calibrate, export, evaluate and bench it as one model.

    The members must be extracted from the same images and predict the same classes; each keeps its
    own normalisation. Accuracy and costs are reported against the last member alone.

    Example: dgate cascade runs/r20-r56 runs/r20 runs/r56   then   dgate fit runs/r20-r56
    """
    data = create(out_run, [str(m) for m in members], member_gates=member_gates, overwrite=overwrite)
    if json:
        print_json(data)
        return
    table = Table(title=f"cascade {out_run}", title_justify="left")
    for col in ("member", "run directory", "gates inside"):
        table.add_column(col)
    for m in data["members"]:
        table.add_row(m["name"], m["run_dir"], ", ".join(m["gates"]) or "-")
    out.print(table)
    out.print(f"splits shared: {', '.join(data['splits'])}")
    out.print(
        f"next: dgate fit {out_run}   (learns exit policies; or go straight to dgate calibrate {out_run} --max-drop 0)"
    )


def render_policy_fit(r: PolicyFit, next_step: bool = True) -> None:
    out.print(
        f"fitted exit policies for {len(r.variants)} variants (trade-off lambda "
        f"{', '.join(f'{v:g}' for v in r.lambdas)}, for each way the answers combine) on '{r.split}' "
        f"({r.num_samples:,} images, {r.folds}-fold cross-fitting) in {r.seconds:.1f} s"
    )
    if next_step:
        out.print(f"next: dgate calibrate {r.run_dir} --max-drop 0")


def render_variants(r: CalibrationResult) -> None:
    """Each variant's cost at the target: how the answers combine and which exit policy."""
    info = r.cascade or {}
    table = Table(title="cascade variants at the target (cost ratio vs the last member)", title_justify="left")
    for col in ("answers", "policy", "lambda", "cost ratio"):
        table.add_column(col, justify="right")
    chosen = info.get("variant")
    for v in info.get("variants", []):
        mark = " (chosen)" if {k: v[k] for k in ("ensemble", "policy", "lambda")} == chosen else ""
        table.add_row(
            "combined" if any(v["ensemble"]) else "own",
            v["policy"],
            "-" if v["lambda"] is None else f"{v['lambda']:g}",
            ("unreachable" if v["cost_ratio"] is None else f"{v['cost_ratio']:.3f}") + mark,
        )
    out.print(table)
