"""``dgate demo``: the whole pipeline, offline, on built-in data and a CNN it trains itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..evaluation.evaluate import evaluate
from ..models.flops import human
from ..pipeline import demo as demo_lib
from ..pipeline.calibrate import calibrate
from ..pipeline.export import export
from ..pipeline.extract import extract
from ..pipeline.fit import fit
from . import _options as o
from ._output import err, out, pct, print_json, progress
from .calibrate import render as render_calibration
from .extract import render as render_extract


def demo_command(
    directory: Annotated[Path, typer.Argument(help="Where to put the demo's data, model and run directory.")] = Path(
        "dgate-demo"
    ),
    train_images: Annotated[int, typer.Option(help="Training images to generate.", min=200)] = 3000,
    epochs: Annotated[int, typer.Option(help="Epochs to train the demo CNN.", min=1)] = 10,
    max_drop: Annotated[float, typer.Option(help="Accuracy drop allowed when calibrating.")] = 0.01,
    device: o.Device = "auto",
    json: o.Json = False,
) -> None:
    """Run dgate end to end, offline: generate shapes of varying difficulty, train a small CNN on them,
    then extract -> fit -> calibrate -> export -> evaluate, as the real commands do.

    Everything is left in DIRECTORY for inspection (images, weights, run directory, exported model);
    a second run reuses the images and the trained CNN.

    Example: dgate demo
    """
    t0 = time.perf_counter()
    d = directory
    sizes = {"train": train_images, "val": 1000, "test": 1000}
    quiet = json
    say = (lambda *a: None) if quiet else err.print
    say(f"[bold]1/6[/] generating {sum(sizes.values()):,} images in {d / 'data'}")
    folders = demo_lib.write_dataset(d / "data", sizes, seed=0)
    weights = d / "demo_cnn.safetensors"
    with progress(enabled=not quiet, unit="epochs") as bar:
        if weights.is_file():
            say(f"[bold]2/6[/] reusing the trained CNN {weights}")
        else:
            say(f"[bold]2/6[/] training the demo CNN ({epochs} epochs on {train_images:,} images)")
            x, y, _ = demo_lib.make_images(train_images, seed=0)
            demo_lib.train(x, y, weights, epochs=epochs, progress=bar)
    run = d / "run"
    say("[bold]3/6[/] dgate extract")
    with progress(enabled=not quiet) as bar:
        ex = extract(
            run,
            "demo_cnn",
            {k: str(v) for k, v in folders.items()},
            weights=str(weights),
            device=device,
            progress=bar,
            overwrite=True,
        )
    if not quiet:
        render_extract(ex)
    say("[bold]4/6[/] dgate fit")
    fitted = fit(run)
    say("[bold]5/6[/] dgate calibrate --max-drop " + f"{max_drop:g}")
    cal = calibrate(run, max_drop=max_drop)
    if not quiet:
        render_calibration(cal)
    say("[bold]6/6[/] dgate export + dgate evaluate on the test images")
    exp = export(run, d / "model", overwrite=True)
    ev = evaluate(exp.out_dir, str(folders["test"]), device=device)
    seconds = time.perf_counter() - t0
    if json:
        print_json(
            {
                "directory": str(d),
                "seconds": round(seconds, 1),
                "gates": [g.gate for g in fitted.gates],
                "calibration": {"target_accuracy": cal.target_accuracy, "predicted_flops_ratio": cal.chosen.cost_ratio},
                "evaluate": ev.to_dict(),
            }
        )
        return
    table = Table(title=f"dgate demo: gated demo_cnn on {ev.images:,} unseen test images", title_justify="left")
    table.add_column("")
    table.add_column("accuracy", justify="right")
    table.add_column(f"mean {ev.unit} / image", justify="right")
    table.add_column("cost", justify="right")
    table.add_row("backbone", pct(ev.backbone_accuracy), human(ev.backbone_cost), "100%")
    table.add_row("gated", pct(ev.accuracy), human(ev.mean_cost), pct(ev.flops_ratio, 1))
    out.print(table)
    exits = ", ".join(f"{n} {100 * f:.0f}%" for n, f in zip(ev.exit_names, ev.exit_fractions, strict=True))
    out.print(
        f"exits: {exits}; {1 - ev.flops_ratio:.0%} fewer MACs for {100 * (ev.backbone_accuracy - ev.accuracy):.2f} points of accuracy"
    )
    out.print(
        f"done in {seconds:.0f} s; everything is in {d}/ (try: dgate evaluate {exp.out_dir} --data {folders['test']})"
    )
