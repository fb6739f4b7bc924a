"""Option types shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..runtime.operating_point import select as select_operating_point
from ._output import fail

RunDir = Annotated[
    Path, typer.Argument(help="Run directory: holds the feature cache, gates and calibration.", show_default=False)
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model spec: cifar_resnet20|32|44|56|110, a torchvision name (resnet50, vit_b_16, ...), "
        "or package.module:factory. Run `dgate models` for the list.",
        show_default=False,
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="Checkpoint: .safetensors, or a torch.save file (read with weights_only=True; the state dict may sit "
        "under 'state_dict' or 'model', 'module.' prefixes are removed), or torchvision:DEFAULT / torchvision:TAG.",
        show_default=False,
    ),
]
ModelKwargs = Annotated[
    str | None,
    typer.Option(
        "--model-kwargs",
        help="Constructor keyword arguments as JSON, e.g. '{\"num_classes\": 10}'.",
        show_default=False,
    ),
]
Gates = Annotated[
    str | None,
    typer.Option(
        "--gates",
        "-g",
        help="Comma-separated gate positions (module names, e.g. layer2.4,layer3), 'all' for every candidate "
        "position, or leave out for the family's defaults. `dgate stages MODEL` lists them.",
        show_default=False,
    ),
]
Device = Annotated[str, typer.Option("--device", "-d", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
BatchSizes = Annotated[
    list[str],
    typer.Option(
        "--batch-size", "-b", help="Images per batch; several are timed one after another: 1,32 or -b 1 -b 32."
    ),
]
Images = Annotated[
    int | None,
    typer.Option(
        "--images", min=1, help="Use N images, evenly spaced over the data (all classes).", show_default=False
    ),
]
MaxDrop = Annotated[
    float | None,
    typer.Option(
        "--max-drop",
        help="Use the cheapest stored operating point within this accuracy drop of the backbone "
        "(e.g. 0.005; the export keeps the frontier `dgate calibrate` found).",
        show_default=False,
    ),
]
Thresholds = Annotated[
    str | None,
    typer.Option(
        "--thresholds",
        help="Comma-separated thresholds, one per gate, instead of the stored ones (inf closes a gate).",
        show_default=False,
    ),
]
NoVerify = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Accept a model directory whose files no longer match the sha256s the export recorded (edited by hand).",
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", "-j", min=0, help="Data loader processes (default: CPU count, at most 8).", show_default=False
    ),
]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow a model factory (package.module:factory) named in a file (the manifest, run.json) to be "
        "imported and run. Off by default: opening a file must not run code.",
    ),
]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables; no progress bars.")
]
Data = Annotated[
    str,
    typer.Option(
        "--data", help="Labelled images: an ImageFolder directory, or cifar10:ROOT:train|test.", show_default=False
    ),
]


def split_list(value: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None or empty -> None."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def float_tuple(value: str | None, name: str) -> tuple[float, ...] | None:
    """Parse ``"0.5,0.5,0.5"``; a clear error otherwise."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers like 0.485,0.456,0.406, got '{value}'", param_hint=name
        ) from None


def batch_sizes(values: list[str]) -> list[int]:
    """``["1,32", "256"]`` -> ``[1, 32, 256]``; a one-line error otherwise."""
    given = ",".join(values)
    try:
        sizes = [int(v) for value in values for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        fail(f"--batch-size must be comma-separated integers like 1,32,256 (or -b 1 -b 32), got '{given}'")
    return sizes


def thresholds_list(value: str | None) -> list[float] | None:
    """``"1.5,inf"`` -> ``[1.5, inf]``; a one-line error otherwise (the model checks the count)."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        fail(f"--thresholds must be one number (or inf) per gate like 1.5,inf, got '{value}'")


def choose_operating_point(model: Any, max_drop: float | None, thresholds: str | None) -> None:
    """Apply ``--max-drop`` (a stored frontier point) or ``--thresholds`` (explicit) to a loaded model."""
    select_operating_point(model, max_drop, thresholds_list(thresholds))
