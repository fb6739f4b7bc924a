"""``dgate stages`` and ``dgate models``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..flops import human
from ..models import list_builtin_models
from ..models.registry import FAMILIES
from ..stages import list_stages
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
    json: o.Json = False,
) -> None:
    """List where gates can go: output shape and cumulative cost at each candidate position.

    Positions marked * are the family's defaults. Pass names to `dgate extract --gates`.

    Example: dgate stages cifar_resnet56
    """
    report = list_stages(model, weights=weights, model_kwargs=model_kwargs, input_size=input_size, all_cuts=all_)
    if json:
        print_json(report.to_dict())
        return
    title = f"{report.model} ({report.family}), {report.input_size}x{report.input_size} input, {human(report.total_macs)}{report.unit}"
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
    out.print("* default gate positions; --all lists every stage boundary (with the other module names of each)")


def models_command() -> None:
    """List the built-in model names and the families dgate knows the stages of."""
    table = Table(title="families with declared gate positions", title_justify="left")
    table.add_column("family")
    table.add_column("module types")
    for f in FAMILIES:
        table.add_row(f.name, ", ".join(t.__name__ for t in f.types))
    out.print(table)
    out.print("Built-in names: " + ", ".join(list_builtin_models()))
    out.print(
        "Any other torch.fx-traceable model works as package.module:factory (gates after top-level modules by default)."
    )
