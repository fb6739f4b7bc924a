"""``dgate stages`` and ``dgate models``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..models.families import FAMILIES
from ..models.flops import human
from ..models.specs import list_builtin_models
from ..pipeline.stages import StagesReport, list_stages
from . import _options as o
from ._output import out, print_json


def stages_command(
    model: Annotated[
        str, typer.Argument(help="Model spec, e.g. cifar_resnet56, resnet50, torchvision:vit_b_16.", show_default=False)
    ],
    weights: o.Weights = None,
    model_kwargs: o.ModelKwargs = None,
    input_size: Annotated[
        int | None, typer.Option(help="Square input size in pixels (default: the model's).", show_default=False)
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="List every stage boundary, not only whole blocks.")] = False,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images whose size (after the model's preprocessing) is the input size: an ImageFolder directory, "
            "or cifar10:ROOT:train|test. --input-size wins.",
            show_default=False,
        ),
    ] = None,
    json: o.Json = False,
) -> None:
    """List where gates can go: output shape and cumulative cost at each candidate position.

    Positions marked * are the default gates, with why each was chosen: the family's, or, for a model
    of no declared family, the cut points nearest each ninth of its MACs. Pass names to
    `dgate extract --gates`. The title says where the input size came from.

    Example: dgate stages cifar_resnet56
    """
    report = list_stages(
        model, weights=weights, model_kwargs=model_kwargs, input_size=input_size, all_cuts=all_, data=data
    )
    if json:
        print_json(report.to_dict())
        return
    title = f"{report.model} ({report.family}), {report.input_note}, {human(report.total_macs)}{report.unit}"
    table = Table(title=title, title_justify="left")
    cols = ["", "position", "output shape", f"stage {report.unit}", f"cumulative {report.unit}", "of model"]
    for col in cols + (["aliases"] if all_ else []):
        table.add_column(col, justify="right" if "MAC" in col or col == "of model" else "left")
    for r in report.rows:
        row = [
            "*" if r.default else "",
            r.name,
            "x".join(map(str, r.shape)),
            human(r.macs),
            human(r.cumulative_macs),
            f"{100 * r.fraction:.1f}%",
        ]
        table.add_row(*row, *([", ".join(r.aliases)] if all_ else []))
    out.print(table)
    out.print(_why_text(report), markup=False, highlight=False)
    out.print("--all lists every stage boundary (with the other module names of each)")


def _why_text(report: StagesReport) -> str:
    """The default gates and why each was chosen: one line when they share a reason, else one per gate."""
    defaults = [r for r in report.rows if r.default]
    if not defaults:
        return "* no default gate positions: pass --gates to `dgate extract`"
    reasons = {r.why for r in defaults}
    if len(reasons) == 1:
        return f"* default gate positions, why: {reasons.pop()}"
    width = max(len(r.name) for r in defaults)
    lines = ["* default gate positions, why:"] + [f"  {r.name:<{width}}  {r.why}" for r in defaults]
    return "\n".join(lines)


def models_command(json: o.Json = False) -> None:
    """List the built-in model names and the families dgate knows the stages of.

    Example: dgate models --json
    """
    if json:
        print_json(
            {
                "families": [{"name": f.name, "types": [t.__name__ for t in f.types]} for f in FAMILIES],
                "builtin": list_builtin_models(),
            }
        )
        return
    table = Table(title="families with declared gate positions", title_justify="left")
    table.add_column("family")
    table.add_column("module types")
    for f in FAMILIES:
        table.add_row(f.name, ", ".join(t.__name__ for t in f.types))
    out.print(table)
    out.print("Built-in names: " + ", ".join(list_builtin_models()))
    out.print(
        "Any other torch.fx-traceable model works as package.module:factory (default gates: the cut points "
        "nearest each ninth of its MACs; `dgate stages` says why)."
    )
