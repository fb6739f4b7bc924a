"""``dgate export`` and ``dgate evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..evaluation.evaluate import evaluate
from ..models.flops import human
from ..pipeline.export import export
from . import _options as o
from ._output import out, pct, print_json, progress


def export_command(
    run_dir: o.RunDir,
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory to write model.safetensors and dgate.json to.", show_default=False),
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    json: o.Json = False,
) -> None:
    """Write the calibrated gated model: model.safetensors (backbone + gates) and dgate.json (manifest).

    Load it in Python with dgate_cli.load(DIR); switch operating points with
    model.use_operating_point(max_drop=...) without recalibrating.

    Example: dgate export runs/r56 --out models/r56-gated
    """
    result = export(run_dir, out_dir, overwrite=overwrite)
    if json:
        print_json(result.to_dict())
        return
    m = result.manifest
    out.print(
        f"wrote {result.out_dir}/model.safetensors ({result.weights_bytes / 1e6:.1f} MB) and dgate.json: "
        f"{m['model']['spec']}, gates {', '.join(g['name'] for g in m['gates'])}, "
        f"{len(m['frontier'])} stored operating points"
    )
    out.print(f"next: dgate evaluate {result.out_dir} --data DATA")


def evaluate_command(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `dgate export`.", show_default=False)],
    data: o.Data,
    device: o.Device = "auto",
    batch_size: o.BatchSize = 256,
    workers: o.Workers = None,
    images: o.Images = None,
    max_drop: o.MaxDrop = None,
    thresholds: o.Thresholds = None,
    trust_code: o.TrustCode = False,
    no_verify: o.NoVerify = False,
    json: o.Json = False,
) -> None:
    """Run the exported gated model (it really exits early) and its own backbone on labelled images.

    Reports accuracy against the backbone's, mean cost per image (gates included) and its ratio to
    the backbone's, where images leave, and which classes leave early.

    --max-drop / --thresholds evaluate another operating point than the exported one: the
    cheapest stored frontier point within that drop, or thresholds of your own.

    Example: dgate evaluate models/r56-gated --data cifar10-jpeg/test --max-drop 0.005
    """
    with progress(enabled=not json) as bar:
        r = evaluate(
            model_dir,
            data,
            device=device,
            batch_size=batch_size,
            workers=workers,
            images=images,
            max_drop=max_drop,
            thresholds=o.thresholds_list(thresholds),
            verify=not no_verify,
            progress=bar,
            trust_code=trust_code,
        )
    if json:
        print_json(r.to_dict())
        return
    out.print(
        f"[bold]accuracy {pct(r.accuracy)}[/] (backbone {pct(r.backbone_accuracy)}, drop {100 * (r.backbone_accuracy - r.accuracy):.2f} points, "
        f"agreement {pct(r.agreement)}) on {r.images:,} images of {r.data}"
    )
    out.print(
        f"mean cost {human(r.mean_cost)}{r.unit} per image vs {human(r.backbone_cost)}{r.unit}: "
        f"flops_ratio [bold]{r.flops_ratio:.3f}[/] ({pct(1 - r.flops_ratio, 1)} fewer, gates included)   device: {r.device}"
    )
    table = Table(title="where images leave, per class", title_justify="left")
    table.add_column("class")
    for name in r.exit_names:
        table.add_column(name, justify="right")
    for c, row in zip(r.classes, r.per_class_exits, strict=True):
        total = sum(row)
        table.add_row(c, *[f"{100 * v / total:.0f}%" if total else "-" for v in row])
    table.add_row("[bold]all[/]", *[f"[bold]{100 * f:.1f}%[/]" for f in r.exit_fractions])
    out.print(table)
    if r.members is not None:
        out.print(
            "cascade (accuracy and flops_ratio against the last member alone): "
            + "; ".join(f"{m['name']} ran for {pct(m['ran'], 1)}, answered {pct(m['answered'], 1)}" for m in r.members)
        )
